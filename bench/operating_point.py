"""``fedprint bench operating-point DATA``: what a real node decides on a labelled data set, at its
own thresholds.

What an operator runs to accept a deployment on a labelled sample of their own prints. It
starts a gallery node (the shared server, mutual TLS on loopback, a development PKI),
enrols every gallery capture of DATA through ``Enroll`` as ``fedprint enroll`` does, lets the
node learn its thresholds from that gallery (``--learning-passes`` passes of
:class:`nodes.gallery.learner.CalibrationLearner`, as the node's background task makes them),
and, with ``--traffic-share``, searches a first share of the probes and lets the node learn from
those searches too (``LearningPolicy.from_traffic``); then searches the rest (all of them without
traffic) through ``Identify`` as the coordinator does and counts what the node decided:

- FNIR at the hit threshold (the mate is the node's rank-1 candidate and a HIT) and at the
  review threshold (rank 1, at least REVIEW), with 95 % Wilson intervals;
- FPIR at both (a non-mated search with a HIT, with at least a REVIEW), with intervals, beside
  the FPIR the thresholds state;
- mates not among the candidates returned (lost by the shortlist, or below rank ``k``);
- the same searches judged by the prior (the shipped calibration) alone: the candidates and their
  scores do not depend on the thresholds, so the prior's bands are recomputed from them;
- the FNIR at the data set's own FPIR-1e-3 quantile (the threshold its own non-mated searches
  would pick), which is what the matcher alone could do;
- seconds per probe, and the thresholds with their source.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.learning import LearningPolicy
from calibration.thresholds import Thresholds
from evaluation.metrics import threshold_at_rate, wilson_interval
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.clients import enroll
from fedprint.datasets import gallery_enrolments, identify_probe, probe_captures
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import issue_dev_pki
from fedprint.rpc import open_channel
from launcher.services import build_node
from minutiae.dataset import CaptureRef, capture_refs
from nodes.gallery.config import NodeConfig, ShortlistConfig
from nodes.gallery.learner import LearningPass

#: Probes per Identify call, and calls in flight (the node batches them on its device).
_PER_CALL, _IN_FLIGHT = 8, 2


@dataclass(frozen=True)
class OperatingPointConfig:
    """What to run: the data set, the node's shortlist, how much to learn, how many probes."""

    data: Path
    shortlist: int = 200
    learning_passes: int = 6
    # A pass compares each pseudo-probe with 250 subjects: about 100,000 pairs, some 100 s on two
    # CPU cores; more passes add more.
    policy: LearningPolicy = field(default_factory=lambda: LearningPolicy(max_candidates=250))
    #: Most mated and non-mated probes to search (None: all), drawn evenly through the manifest.
    mated: int | None = None
    nonmated: int | None = None
    k: int = 10
    device: str = "auto"
    #: Share of the mated and of the non-mated probes searched first, as traffic the node learns
    #: from before the rest are searched and counted (0: no traffic; every probe counted).
    traffic_share: float = 0.0
    #: Learning passes after the traffic (each moves a threshold ``max_step`` at most).
    traffic_passes: int = 2


@dataclass(frozen=True)
class Search:
    """One probe's answer as the bench keeps it."""

    mate: str | None
    decision: int
    decided_by: str
    #: (subject id, fused score, fingers compared) per candidate returned, best evidence first.
    candidates: list[tuple[str, float, int]]
    gallery_size: int


def _evenly(items: Sequence[CaptureRef], most: int | None) -> list[CaptureRef]:
    if most is None or most >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, most).round().astype(int)]


def _chunks(items: Sequence[CaptureRef], size: int) -> Iterator[Sequence[CaptureRef]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


def _rate(successes: int, n: int) -> dict[str, float | int]:
    if n == 0:
        return {"value": 0.0, "low": 0.0, "high": 1.0, "n": 0, "count": 0}
    ci = wilson_interval(successes, n)
    return {"value": ci.value, "low": ci.low, "high": ci.high, "n": n, "count": successes}


def _band(score: float, fingers: int, size: int, calibration: Thresholds) -> int:
    t = calibration.for_gallery(size, max(1, fingers))
    return bio.HIT if score >= t.hit else bio.REVIEW if score >= t.review else bio.NO_HIT


def _outcomes(searches: list[Search], judge: Any) -> dict[str, Any]:
    """FNIR and FPIR at hit and review of ``searches``, each candidate banded by ``judge``
    (None: the node's own decision)."""
    mated = [s for s in searches if s.mate is not None]
    nonmated = [s for s in searches if s.mate is None]

    def top(s: Search) -> tuple[int, str]:
        if judge is None:
            return s.decision, s.decided_by
        if not s.candidates:
            return bio.NO_HIT, ""
        banded = [(judge(score, fingers, s.gallery_size), score, sid) for sid, score, fingers in s.candidates]
        best = min(banded, key=lambda b: ({bio.HIT: 0, bio.REVIEW: 1}.get(b[0], 2), -b[1]))
        return best[0], best[2]

    tops = [(s, *top(s)) for s in searches]
    return {
        "fnir_at_hit": _rate(
            sum(1 for s, d, by in tops if s.mate and not (d == bio.HIT and by == s.mate)), len(mated)
        ),
        "fnir_at_review": _rate(
            sum(1 for s, d, by in tops if s.mate and not (d in (bio.HIT, bio.REVIEW) and by == s.mate)),
            len(mated),
        ),
        "fpir_at_hit": _rate(sum(1 for s, d, _ in tops if s.mate is None and d == bio.HIT), len(nonmated)),
        "fpir_at_review": _rate(
            sum(1 for s, d, _ in tops if s.mate is None and d in (bio.HIT, bio.REVIEW)), len(nonmated)
        ),
    }


def _own_quantile(searches: list[Search], fpir: float = 1e-3) -> dict[str, Any]:
    """FNIR at the threshold the data set's own non-mated searches give FPIR ``fpir`` (on raw
    fused scores, mate at rank 1 by score): what the matcher alone could do on this data."""
    nonmated_top = [max((c[1] for c in s.candidates), default=-1e9) for s in searches if s.mate is None]
    threshold = threshold_at_rate(nonmated_top, fpir) if nonmated_top else None
    mated = [s for s in searches if s.mate is not None]
    if threshold is None:
        return {"threshold": None, "fnir": None}
    missed = 0
    for s in mated:
        best = max(s.candidates, key=lambda c: c[1], default=None)
        if best is None or best[0] != s.mate or best[1] < threshold:
            missed += 1
    return {"threshold": threshold, "fpir": fpir, "fnir": _rate(missed, len(mated))}


async def _search(
    address: str, tls: Any, data: Path, probes: list[CaptureRef], enrolled: set[str], k: int
) -> list[Search]:
    searches: list[Search] = []
    queue = list(_chunks(probes, _PER_CALL))
    async with open_channel(address, tls, server="iafis", retries=False) as channel:
        stub = gal_grpc.GalleryServiceStub(channel)

        async def worker() -> None:
            while queue:
                chunk = queue.pop(0)
                request = gal.IdentifyRequest(
                    probes=[identify_probe(data, ref, f"P{i}") for i, ref in enumerate(chunk)], max_results=k
                )
                response = await stub.Identify(request, timeout=600)
                for ref, result in zip(chunk, response.results, strict=True):
                    searches.append(
                        Search(
                            mate=ref.subject_id if ref.subject_id in enrolled else None,
                            decision=result.decision,
                            decided_by=result.decided_by,
                            candidates=[
                                (c.subject_id, c.fused_score, len(c.finger_scores)) for c in result.candidates
                            ],
                            gallery_size=response.gallery_size,
                        )
                    )

        await asyncio.gather(*(worker() for _ in range(_IN_FLIGHT)))
    return searches


def _report(done: LearningPass) -> dict[str, Any]:
    """One learning pass as the report lists it."""
    moved = [round(m, 3) for m in done.adoption.moves] if done.adoption else []
    return {"pairs_added": done.pairs, "moved": moved, "why_not": done.why_not}


async def run_operating_point(config: OperatingPointConfig, progress: Any = None) -> dict[str, Any]:
    """Runs the bench; returns the report ``--json`` writes."""
    say = progress or (lambda text: None)
    refs = capture_refs(config.data)
    enrolments = gallery_enrolments(config.data, "criminal_history", refs)
    enrolled = {e.subject_id for e in enrolments}
    probes = probe_captures(config.data, refs)
    mated = _evenly([p for p in probes if p.subject_id in enrolled], config.mated)
    nonmated = _evenly([p for p in probes if p.subject_id not in enrolled], config.nonmated)
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedprint-operating-")))
        pki = issue_dev_pki(root / "pki", oris=[])
        # The background task stays idle (interval far away): the bench makes the passes itself.
        # Traffic searched first is learned from (policy.from_traffic), else it is not searched.
        policy = config.policy.model_copy(
            update={"interval_s": 1e9, "from_traffic": config.policy.from_traffic or config.traffic_share > 0}
        )
        node_config = NodeConfig(
            node="iafis",
            data_dir=root / "node",
            tls=pki["iafis"],
            device=config.device,
            learning=policy,
            # The shortlist at any gallery size (K = 0: every subject scored in full), as a node
            # with a large gallery searches.
            shortlist=ShortlistConfig(
                enabled=config.shortlist > 0, candidates=max(1, config.shortlist), min_gallery=1
            ),
            gallery_cache=False,
        )
        node = build_node(node_config)
        await node.start()
        try:
            say(f"enrolling {len(enrolments)} subjects")
            started = time.perf_counter()
            await enroll(node.host.address, enrolments, tls=pki["admin"], deadline_s=3600)
            enrol_s = time.perf_counter() - started
            learner = node.servicer.learner
            passes = []
            started = time.perf_counter()
            for i in range(config.learning_passes):
                say(f"learning from the gallery: pass {i + 1} of {config.learning_passes}")
                passes.append(_report(await asyncio.to_thread(learner.learn)))
            learn_s = time.perf_counter() - started
            first_mated = mated[: round(config.traffic_share * len(mated))]
            first_nonmated = nonmated[: round(config.traffic_share * len(nonmated))]
            first: list[Search] = []
            if first_mated or first_nonmated:
                say(
                    f"searching {len(first_mated)} mated and {len(first_nonmated)} non-mated probes (traffic)"
                )
                first = await _search(
                    node.host.address,
                    pki["coordinator"],
                    config.data,
                    [*first_mated, *first_nonmated],
                    enrolled,
                    config.k,
                )
                for i in range(config.traffic_passes):
                    say(f"learning from the gallery and the traffic: pass {i + 1} of {config.traffic_passes}")
                    passes.append(_report(await asyncio.to_thread(learner.learn)) | {"after_traffic": True})
            rest = [*mated[len(first_mated) :], *nonmated[len(first_nonmated) :]]
            say(f"searching {len(rest)} probes")
            started = time.perf_counter()
            searches = await _search(
                node.host.address, pki["coordinator"], config.data, rest, enrolled, config.k
            )
            search_s = time.perf_counter() - started
            size = len(node.servicer.gallery)
            current, prior = learner.current, learner.prior
        finally:
            await node.stop(0)
    own = _outcomes(searches, None)
    shipped = _outcomes(searches, lambda score, fingers, n: _band(score, fingers, n, prior))
    lost = sum(1 for s in searches if s.mate and all(c[0] != s.mate for c in s.candidates))
    ten, ten_prior = current.for_gallery(size, 10), prior.for_gallery(size, 10)
    return {
        "data": str(config.data),
        "gallery_size": size,
        "mated_searches": sum(1 for s in searches if s.mate is not None),
        "nonmated_searches": sum(1 for s in searches if s.mate is None),
        "traffic_searches": {
            "mated": sum(1 for s in first if s.mate is not None),
            "nonmated": sum(1 for s in first if s.mate is None),
            "at_node_thresholds_then": _outcomes(first, None) if first else None,
        },
        "shortlist": config.shortlist,
        "k": config.k,
        "at_node_thresholds": own,
        "at_prior_thresholds": shipped,
        "at_own_fpir_quantile": _own_quantile(searches),
        "mates_not_returned": _rate(lost, len(mated)),
        "stated_fpir": {"hit": current.hit_fpir, "review": current.review_fpir},
        "thresholds": {
            "source": current.source,
            "hit_10_fingers": ten.hit,
            "review_10_fingers": ten.review,
            "prior_hit_10_fingers": ten_prior.hit,
            "prior_review_10_fingers": ten_prior.review,
            "hit_by_fingers": [current.for_gallery(size, f).hit for f in range(1, 11)],
            "prior_hit_by_fingers": [prior.for_gallery(size, f).hit for f in range(1, 11)],
        },
        "learning": {"passes": passes, "seconds": learn_s, "policy": policy.model_dump(mode="json")},
        "enrol_seconds": enrol_s,
        "seconds_per_probe": search_s / max(1, len(searches)),
    }
