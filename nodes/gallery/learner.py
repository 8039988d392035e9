"""A node learning its thresholds from its own gallery, in the background (:mod:`calibration.learning`).

Each pass draws enrolled subjects not drawn before as pseudo-probes, scores each against the
gallery (every subject, or a random ``max_candidates`` of them) exactly as a search scores a
probe, on the node's device and in chunks, and adds the impostor pairs to the sample the node
keeps; subjects drawn in earlier passes are not candidates again, so each unordered pair counts
once. Once the sample holds enough evidence, the learned tails are adopted within the policy's
bounds, stored (``gallery_calibration_updates``: the node's record of every move, and what it
restarts with), logged, and counted in ``fedprint_gallery_calibration_updates_total``. Suspected
duplicates (the same person under two ids) are left out of the sample and reported to the
administrator in the log and in ``fedprint_gallery_suspected_duplicates``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch

from calibration.learning import (
    Adoption,
    ImpostorSample,
    LearningPolicy,
    TrafficSample,
    adopt,
    learn_tails,
)
from calibration.tails import CalibrationError
from calibration.thresholds import TailModel, Thresholds, calibration_digest
from gpu_kernels.fusion import score_tenprints
from nodes.gallery.gallery import FullTier, Gallery, SearchResult
from nodes.gallery.store import CalibrationUpdate, GalleryStore

log = structlog.get_logger(__name__)

#: How many tail scales the best candidate must stand above the second to be taken for a mate
#: (ln 1000: an exponential tail's two best impostors are that far apart once in 1,000 searches).
MATE_GAP = math.log(1000.0)
#: Pseudo-probes scored in one device call, and candidates gathered onto the device at a time.
_PROBES, _CANDIDATES = 16, 2048


def prior_digest(prior: Thresholds, policy: LearningPolicy) -> str:
    """What a learned calibration was learned under: the configured one and the policy's bounds."""
    bounds = policy.model_dump(mode="json", exclude={"enabled", "interval_s"})
    text = json.dumps({"prior": calibration_digest(prior), "policy": bounds}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LearningPass:
    """What one pass did: pairs added, and the adoption when the thresholds moved."""

    pairs: int
    adoption: Adoption | None
    why_not: str = ""


class CalibrationLearner:
    """The thresholds a node judges by (:attr:`current`) and the sample they are learned from."""

    def __init__(
        self, gallery: Gallery, store: GalleryStore[Any], prior: Thresholds, policy: LearningPolicy
    ) -> None:
        self.gallery = gallery
        self.store = store
        self.prior = prior
        self.policy = policy
        self.digest = prior_digest(prior, policy)
        self.current = prior
        self.sample = ImpostorSample(max_pairs=policy.max_pairs)
        self.traffic = TrafficSample(policy)
        self.updates = 0
        #: Each subject drawn as a pseudo-probe, and when (its place in the order of draws).
        self._drawn_at: dict[str, int] = {}
        self._rng = np.random.default_rng(policy.seed)
        self._stopping = threading.Event()
        if self.active:
            stored = store.calibration_updates(self.digest, limit=1)
            if stored:
                self.current = Thresholds.model_validate_json(stored[0].thresholds)
                log.info("learned calibration restored", source=self.current.source, at=str(stored[0].at))

    def stop(self) -> None:
        """Ends a pass in progress at its next batch (the node is shutting down)."""
        self._stopping.set()

    @property
    def active(self) -> bool:
        """Whether the thresholds may move at all (learning on, not pinned, a calibration with tails)."""
        return self.policy.enabled and not self.policy.pinned and bool(self.prior.tails)

    def learn(self) -> LearningPass:
        """One pass (blocking: run it in a worker thread)."""
        if not self.active:
            return LearningPass(0, None, "learning is off, pinned, or the calibration has no tails")
        ids, full, _ = self.gallery.full_tier()
        size = len(ids)
        if full is None or size < self.policy.min_subjects:
            needed = self.policy.min_subjects
            return LearningPass(0, None, f"{size} subjects enrolled: need {needed} to learn")
        never = np.iinfo(np.int64).max
        drawn_at = np.array([self._drawn_at.get(s, never) for s in ids], dtype=np.int64)
        probes = self._rng.permutation(np.flatnonzero(drawn_at == never))[: self.policy.probe_subjects]
        drawn_at[probes] = len(self._drawn_at) + np.arange(len(probes))
        self._drawn_at.update((ids[int(r)], int(drawn_at[r])) for r in probes)
        seen = len(self.sample.duplicates)
        added = self._score(ids, full, probes, drawn_at)
        if self._stopping.is_set():
            return LearningPass(0, None, "the node is stopping")
        for dup in self.sample.duplicates[seen:]:
            log.warning(
                "suspected duplicate enrolment",
                first=dup.first,
                second=dup.second,
                score=round(dup.score, 2),
                fingers=dup.fingers,
            )
        pairs = self.sample.pairs(10)
        try:
            tails, source = self._tails()
            adoption = adopt(self.prior, self.current, tails, size, self.policy, source)
        except CalibrationError as why:
            log.info("calibration not learned yet", reason=str(why), pairs_added=added)
            return LearningPass(added, None, str(why))
        if self.updates and max(abs(m) for m in adoption.moves) < 1e-3:
            return LearningPass(added, None, "the learned thresholds are where the node's are")
        self.store.record_calibration(
            CalibrationUpdate(
                at=dt.datetime.now(dt.UTC),
                prior=self.digest,
                gallery_size=size,
                subjects=len(self.sample.subjects),
                pairs=pairs,
                duplicates=len(self.sample.duplicates),
                thresholds=adoption.thresholds.model_dump_json(),
                moves=[round(m, 4) for m in adoption.moves],
            )
        )
        self.current = adoption.thresholds
        self.updates += 1
        ten = adoption.thresholds.for_gallery(size, 10)
        log.info(
            "calibration learned",
            gallery_size=size,
            pairs=pairs,
            hit_10=round(ten.hit, 3),
            review_10=round(ten.review, 3),
            moves=[round(m, 2) for m in adoption.moves],
            held_by_bounds=sum(adoption.held),
        )
        return LearningPass(added, adoption)

    def _tails(self) -> tuple[list[TailModel], str]:
        """Per finger count the tail to move toward: the traffic's where it has enough evidence,
        else the gallery's, else the current one (see :mod:`calibration.learning`); and the
        source that says what they rest on. CalibrationError when neither source has enough."""
        try:
            gallery: list[TailModel] | None = learn_tails(self.sample, self.policy)
            why = ""
        except CalibrationError as error:
            gallery, why = None, str(error)
        tails, from_traffic = [], []
        for fingers in range(1, 11):
            below = gallery[fingers - 1] if gallery else self.current.tail(fingers)
            assert below is not None  # active: the calibration has tails
            try:
                if not self.policy.from_traffic:
                    raise CalibrationError("learning from traffic is off")
                tails.append(self.traffic.tail(fingers, below))
                from_traffic.append(fingers)
            except CalibrationError:
                tails.append(below)
        if gallery is None and not from_traffic:
            raise CalibrationError(why)
        parts = []
        if from_traffic:
            searches = sum(self.traffic.searches(f) for f in from_traffic)
            parts.append(f"{searches} searches ({_counts(from_traffic)} fingers)")
        if gallery is not None and len(from_traffic) < 10:
            parts.append(
                f"{self.sample.pairs(10)} impostor pairs of {len(self.sample.subjects)} enrolled subjects "
                f"({len(self.sample.duplicates)} suspected duplicates left out)"
            )
        return tails, f"learned from {' and '.join(parts)}; prior: {self.prior.source}"

    def observe(self, results: Sequence[SearchResult], fingers: Sequence[int], k: int) -> None:
        """Adds the node's searches to the traffic sample: per probe (comparing ``fingers[i]``
        fingers), the fused scores of the candidates compared on all of them, and its ``k``-th
        score when it returned ``k``. The best candidate is left out when it stands apart from
        the second (:data:`MATE_GAP` tail scales above it): a mate, hit or not, does, and an
        impostor's maximum almost never does (with an exponential tail the gap between the two
        best impostors exceeds it once in a thousand searches). Leaving out every HIT instead
        would keep the mates below the hit threshold, whose scores fatten the tail, raise the
        thresholds and so keep more mates below them."""
        if not (self.active and self.policy.from_traffic):
            return
        for result, probe_fingers in zip(results, fingers, strict=True):
            matches = result.matches
            tail = self.current.tail(probe_fingers)
            if not matches or tail is None:
                continue
            fused = np.array([m.fused for m in matches])
            ordered = np.sort(fused)[::-1]
            compared = np.array([len(m.finger_scores) == probe_fingers for m in matches])
            scores = fused[compared]
            kth = float(ordered[-1]) if len(matches) >= k else -np.inf
            if len(ordered) > 1 and ordered[0] - ordered[1] > MATE_GAP * tail.scale:
                scores = scores[scores < ordered[0]]
            self.traffic.add(probe_fingers, scores, kth, result.searched)

    def _score(
        self,
        ids: tuple[str, ...],
        full: FullTier,
        probes: npt.NDArray[np.int64],
        drawn_at: npt.NDArray[np.int64],
    ) -> int:
        """Scores ``probes`` (gallery rows) against the candidates and adds the impostor pairs;
        returns how many pairs it added. ``drawn_at``: per gallery row, when it was drawn as a
        pseudo-probe (never: the largest int64); a pair of two pseudo-probes counts once, from
        the one drawn later."""
        added = 0
        device, params = self.gallery.device, self.gallery.params
        size = len(ids)
        candidates = np.arange(size)
        if size > self.policy.max_candidates:
            candidates = np.sort(self._rng.choice(size, self.policy.max_candidates, replace=False))
        for lo in range(0, len(probes), _PROBES):
            if self._stopping.is_set():
                return added
            batch = probes[lo : lo + _PROBES]
            probe_cylinders = full.select(batch, device, params)
            for clo in range(0, len(candidates), _CANDIDATES):
                rows = candidates[clo : clo + _CANDIDATES]
                with torch.inference_mode():
                    scores = score_tenprints(probe_cylinders, full.select(rows, device, params), params)
                if scores.finger_llr is None:
                    raise CalibrationError("the node's fusion gives no per-finger evidence to learn from")
                llr = torch.where(scores.both_present, scores.finger_llr, torch.nan).double().cpu().numpy()
                # Keep pairs with a candidate drawn after the probe, or never drawn (not itself).
                keep = drawn_at[rows][None, :] > drawn_at[batch][:, None]
                p, c = np.nonzero(keep)
                self.sample.add(llr[p, c], batch[p], rows[c], ids, self.prior, self._rng)
                added += len(p)
        return added


def _counts(fingers: list[int]) -> str:
    """``[1, 2, 3, 10]`` as "1-3, 10"."""
    runs: list[list[int]] = []
    for f in fingers:
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
