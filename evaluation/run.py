"""``fedprint eval``: 1:1 and 1:N accuracy of the MCC matcher on a data set in the standard layout.

Two experiments on one data set (see :mod:`minutiae.dataset`):

- **1:1, single finger.** Every probe finger is compared with every gallery finger of the same
  subject and position (all genuine pairs). Impostor pairs are sampled in *blocks*: subjects are
  shuffled (by seed) and cut into blocks of B; within a block every probe finger meets every
  gallery finger of the same position, so one ``[B, B]`` call of :func:`score_fingers` yields the
  block's genuine pairs on its diagonal and ``B·(B-1)`` impostor pairs off it. B follows from the
  impostor count asked for; nothing is scored twice and no pair is scored alone.
- **1:N, ten-print.** Every probe capture (or a seeded sample of ``searches`` of them) is
  searched against the whole gallery with :func:`score_tenprints`, in batches of probes; with
  ``shortlist=K`` the search goes through the nodes' two tiers instead (the faiss shortlist of
  :mod:`gpu_kernels.shortlist` votes K subjects, full MCC scores only those), and a mate the
  shortlist missed counts as not found, exactly as a node would report it. A probe
  whose subject is enrolled is a *mated* search (its mate's score against the best non-mate); the
  same search with the mate left out also serves as a *non-mated* search of a gallery one smaller
  (the usual leave-mate-out estimate, stated in the output). Probes of subjects not enrolled are
  plain non-mated searches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.evidence_fit import PairScores, fit_evidence_model, normalised_pair_scores
from calibration.thresholds import Thresholds, calibration_digest
from evaluation import metrics
from gpu_kernels import (
    EvidenceModel,
    Fusion,
    FusionParams,
    MccParams,
    TenPrintCylinders,
    TenPrintScores,
    encode_fingers,
    encode_tenprints,
    score_fingers,
    score_tenprints,
    shipped_model,
)
from gpu_kernels.evidence import DEFAULT_MIN_COHORT
from gpu_kernels.shortlist import ShortlistIndex, enrolment_descriptors, score_shortlisted
from minutiae.dataset import Capture, Dataset
from minutiae.template import FingerTemplate

FMR_TARGETS = (1e-2, 1e-3, 1e-4)
FPIR_TARGETS = (1e-2, 1e-3)
#: Points of the calibration curve written into node configs (for per-request target FPIR).
CURVE_FPIRS = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4)

Progress = Callable[[str, int, int], None]

#: The fusions ``fedprint eval --fusion`` knows: the evidence model (LLR sum, the nodes' default)
#: and the shrunk mean it replaced.
FUSION_NAMES = ("evidence", "mean")
#: A threshold resting on fewer non-mated scores than this is flagged in the report.
THIN_THRESHOLD = 10
#: Probe fingers with at most / at least this many minutiae, for the tail comparison of the report.
FEW_MINUTIAE, MANY_MINUTIAE = 12, 30


def fusion_named(name: str, model: EvidenceModel | None = None) -> Fusion:
    """The fusion called ``name`` (see :data:`FUSION_NAMES`); ``model`` replaces the shipped one."""
    if name == "evidence":
        return model or shipped_model()
    if name == "mean":
        return FusionParams()
    raise ValueError(f"unknown fusion {name!r}; known: {', '.join(FUSION_NAMES)}")


@dataclass(frozen=True)
class EvalOptions:
    """What ``fedprint eval`` runs: impostor sample size, search cap, seed, device, batch size."""

    impostor_pairs: int = 100_000
    searches: int | None = None
    seed: int = 0
    device: str = "cpu"
    probe_batch: int = 8
    #: Subjects the shortlist passes to full MCC per search; None searches exhaustively.
    shortlist: int | None = None
    #: Fusions whose 1:N outcomes are reported, on the same scores; the first is the primary one.
    fusions: tuple[str, ...] = ("evidence",)
    #: Evidence model to use instead of the shipped one (a freshly fitted one, say).
    model: EvidenceModel | None = None
    #: Fewest subjects per impostor block of the 1:1 experiment (a fit wants each probe finger to
    #: meet a cohort as large as a search's).
    min_block: int = 1
    #: Fit the evidence model on this data set's 1:1 pairs and search with it (``--fit-fusion``).
    fit_fusion: bool = False
    #: Smaller galleries (seeded subsets of the gallery) searched again, to check that the
    #: calibration's FPIR holds at each size (``--gallery-sizes``).
    gallery_sizes: tuple[int, ...] = ()
    #: The calibration checked at each gallery size (None: no check).
    calibration: Thresholds | None = None
    #: The calibration a node would judge these searches by (the shipped one, or the one given):
    #: the report's operating point, at the evaluation's gallery size and, for each candidate,
    #: the thresholds of the fingers it was compared on (None: no operating point).
    operating: Thresholds | None = None


@dataclass(frozen=True)
class OperatingOutcomes:
    """1:N outcomes as a node decides them: each candidate's score is its margin over the
    threshold of its own finger count (hit or review), so 0 is the boundary for everyone."""

    hit: metrics.SearchOutcomes
    review: metrics.SearchOutcomes


@dataclass(frozen=True)
class EvalResult:
    """Raw scores of both experiments; :func:`summary` turns them into the JSON report."""

    block_size: int
    #: The 1:1 comparisons with their minutia counts (what ``--fit-fusion`` fits on).
    pairs: PairScores
    #: 1:N outcomes per fusion name, on the same searches.
    by_fusion: dict[str, metrics.SearchOutcomes]
    #: The primary fusion's name (:attr:`outcomes` are its).
    fusion: str
    #: The evidence model the searches were fused with.
    model: EvidenceModel
    gallery_size: int
    searches: int
    probe_captures: int
    templates: int
    #: Shortlist length of the 1:N searches (None: exhaustive) and the share of mated searches
    #: whose mate it kept.
    shortlist: int | None = None
    shortlist_mate_recall: float | None = None
    #: Primary-fusion outcomes per gallery size, the full gallery included (``--gallery-sizes``).
    by_gallery_size: dict[int, metrics.SearchOutcomes] | None = None
    #: The calibration those are checked against.
    calibration: Thresholds | None = None
    #: The primary fusion's outcomes at the operating point, and the calibration behind them.
    operating: OperatingOutcomes | None = None
    operating_calibration: Thresholds | None = None

    @cached_property
    def genuine(self) -> metrics.FloatArray:
        """Single-finger genuine scores of the 1:1 experiment."""
        return self.pairs.score[self.pairs.genuine]

    @cached_property
    def impostor(self) -> metrics.FloatArray:
        """Single-finger impostor scores of the 1:1 experiment."""
        return self.pairs.score[~self.pairs.genuine]

    @property
    def outcomes(self) -> metrics.SearchOutcomes:
        """The primary fusion's 1:N outcomes."""
        return self.by_fusion[self.fusion]


def _noop(stage: str, done: int, total: int) -> None:
    pass


def verification_scores(
    dataset: Dataset, params: MccParams, options: EvalOptions, progress: Progress = _noop
) -> tuple[PairScores, int]:
    """The 1:1 comparisons (sampled as the module doc says) and the block size."""
    rng = np.random.default_rng([options.seed, 1])
    subjects = sorted({c.subject_id for c in dataset.probes} & {c.subject_id for c in dataset.gallery})
    if not subjects:
        return PairScores.concat([]), 1
    index = {s: i for i, s in enumerate(subjects)}
    # Expected genuine pairs per subject, to size blocks for the impostor count asked for.
    per_subject = max(
        1.0,
        sum(len(c.tenprint.fingers) for c in dataset.probes if c.subject_id in index) / len(subjects),
    )
    genuine_total = per_subject * len(subjects)
    wanted = max(options.min_block, 1 + math.ceil(options.impostor_pairs / genuine_total))
    block = int(min(len(subjects), max(1, wanted)))
    parts: list[PairScores] = []
    # One shuffle for all positions: a block's subjects meet on every finger, so each block also
    # yields B·(B-1) ten-print impostor pairs (what the gallery-size calibration models).
    order = rng.permutation(len(subjects))
    for position in range(1, 11):
        progress("1:1 single finger", position - 1, 10)
        probe_fingers = _fingers(dataset.probes, position, index)
        gallery_fingers = _fingers(dataset.gallery, position, index)
        if not probe_fingers[0] or not gallery_fingers[0]:
            continue
        left = encode_fingers(probe_fingers[0], params, options.device)
        right = encode_fingers(gallery_fingers[0], params, options.device)
        left_valid, right_valid = left.valid.sum(-1).cpu().numpy(), right.valid.sum(-1).cpu().numpy()
        left_minutiae = left.counts.cpu().numpy()
        left_subject, right_subject = np.array(probe_fingers[1]), np.array(gallery_fingers[1])
        for lo in range(0, len(subjects), block):
            members = order[lo : lo + block]
            li = np.flatnonzero(np.isin(left_subject, members))
            ri = np.flatnonzero(np.isin(right_subject, members))
            if not len(li) or not len(ri):
                continue
            scores = score_fingers(
                left.select(torch.from_numpy(li)), right.select(torch.from_numpy(ri)), params
            ).cpu()
            shape = (len(li), len(ri))
            parts.append(
                PairScores(
                    score=scores.numpy().astype(np.float64).ravel(),
                    probe_count=_per_pair(left_valid[li][:, None], shape),
                    gallery_count=_per_pair(right_valid[ri][None, :], shape),
                    probe_minutiae=_per_pair(left_minutiae[li][:, None], shape),
                    position=np.full(len(li) * len(ri), position, dtype=np.int64),
                    genuine=(left_subject[li][:, None] == right_subject[ri][None, :]).ravel(),
                    # One cohort per probe finger: its position and its index among them.
                    row=np.repeat(position * len(dataset.probes) + li, len(ri)).astype(np.int64),
                    probe_subject=_per_pair(left_subject[li][:, None], shape),
                    gallery_subject=_per_pair(right_subject[ri][None, :], shape),
                )
            )
    progress("1:1 single finger", 10, 10)
    return PairScores.concat(parts), block


def _per_pair(values: np.ndarray[Any, Any], shape: tuple[int, int]) -> np.ndarray[Any, Any]:
    return np.broadcast_to(values, shape).ravel().astype(np.int64)


def _fingers(
    captures: tuple[Capture, ...], position: int, index: dict[str, int]
) -> tuple[list[FingerTemplate | None], list[int]]:
    templates: list[FingerTemplate | None] = []
    owners: list[int] = []
    for c in captures:
        t = c.tenprint.fingers.get(position)
        if t is not None and c.subject_id in index:
            templates.append(t)
            owners.append(index[c.subject_id])
    return templates, owners


def _concat(parts: list[metrics.FloatArray]) -> metrics.FloatArray:
    return np.concatenate(parts) if parts else np.zeros(0)


class _Searcher:
    """Scores probe batches against the gallery, exhaustively or through the shortlist; returns
    the :class:`TenPrintScores` ``[P, K]`` and the gallery rows ``[P, K]`` behind their columns,
    K the gallery size or the shortlist length."""

    def __init__(
        self, gallery: TenPrintCylinders, params: MccParams, shortlist: int | None, fusion: Fusion
    ) -> None:
        self.gallery = gallery
        self.params = params
        self.fusion = fusion
        self.shortlist = shortlist if shortlist is not None and shortlist < len(gallery) else None
        self.index = (
            None
            if self.shortlist is None
            else ShortlistIndex.build(enrolment_descriptors(gallery), gallery.present)
        )

    def __call__(self, probes: TenPrintCylinders) -> tuple[TenPrintScores, np.ndarray[Any, Any]]:
        if self.index is None or self.shortlist is None:
            scores = score_tenprints(probes, self.gallery, self.params, fusion=self.fusion)
            rows = np.broadcast_to(np.arange(len(self.gallery)), tuple(scores.fused.shape))
            return scores, rows
        short = self.index.candidates(probes, self.shortlist)
        scores = score_shortlisted(probes, self.gallery, short, self.params, fusion=self.fusion)
        return scores, short.numpy()


@dataclass
class _Outcomes:
    """Running lists of one fusion's 1:N outcomes."""

    mate: list[float]
    best_nonmate: list[float]
    nonmated: list[float]

    def add(
        self, fused: np.ndarray[Any, Any], is_mate: np.ndarray[Any, Any], has_mate: np.ndarray[Any, Any]
    ) -> None:
        # A mate the shortlist did not pass on was not found: -inf, below any threshold.
        mate_score = np.where(is_mate, fused, -np.inf).max(axis=1, initial=-np.inf)
        nonmate_score = np.where(is_mate, -np.inf, fused).max(axis=1, initial=-np.inf)
        self.mate.extend(mate_score[has_mate].tolist())
        self.best_nonmate.extend(nonmate_score[has_mate].tolist())
        # Leave-mate-out: the best non-mate is also the top of a non-mated search (if any non-mate).
        self.nonmated.extend(nonmate_score[np.isfinite(nonmate_score)].tolist())

    def done(self) -> metrics.SearchOutcomes:
        return metrics.SearchOutcomes(
            np.array(self.mate), np.array(self.best_nonmate), np.array(self.nonmated)
        )


def _margins(calibration: Thresholds, size: int, which: str) -> np.ndarray[Any, Any]:
    """``[11]`` thresholds by fingers compared (index 0, no finger in common: no candidate)."""
    by_fingers = [getattr(calibration.for_gallery(size, max(1, f)), which) for f in range(11)]
    by_fingers[0] = np.inf
    return np.array(by_fingers)


def identification(
    dataset: Dataset, params: MccParams, options: EvalOptions, progress: Progress = _noop
) -> tuple[dict[str, metrics.SearchOutcomes], int, float | None, OperatingOutcomes | None]:
    """1:N outcomes per fusion of ``options.fusions`` (all probes, or a seeded sample of
    ``options.searches``), the number of searches, and (with a shortlist) the share of mated
    searches whose mate it kept. Every fusion sees the very same per-finger scores."""
    probes = list(dataset.probes)
    stage = f"1:N ten-print, gallery {len(dataset.gallery)}"
    if options.searches is not None and options.searches < len(probes):
        rng = np.random.default_rng([options.seed, 2])
        probes = [probes[i] for i in sorted(rng.choice(len(probes), options.searches, replace=False))]
    fusions = {name: fusion_named(name, options.model) for name in options.fusions}
    if not probes or not dataset.gallery:
        empty = np.zeros(0)
        return (
            {n: metrics.SearchOutcomes(empty, empty, empty) for n in fusions},
            len(dataset.gallery),
            None,
            None,
        )
    progress("1:N encoding the gallery", 0, 1)
    gallery = encode_tenprints([c.tenprint for c in dataset.gallery], params, options.device)
    primary = options.fusions[0]
    search = _Searcher(gallery, params, options.shortlist, fusions[primary])
    gallery_ids = np.array([c.subject_id for c in dataset.gallery])
    running = {name: _Outcomes([], [], []) for name in fusions}
    at_hit, at_review = _Outcomes([], [], []), _Outcomes([], [], [])
    if options.operating is not None:
        hit_t = _margins(options.operating, len(dataset.gallery), "hit")
        review_t = _margins(options.operating, len(dataset.gallery), "review")
    kept = enrolled = 0
    for lo in range(0, len(probes), options.probe_batch):
        progress(stage, lo, len(probes))
        batch = probes[lo : lo + options.probe_batch]
        scores, rows = search(encode_tenprints([c.tenprint for c in batch], params, options.device))
        batch_ids = np.array([c.subject_id for c in batch])
        is_mate = batch_ids[:, None] == gallery_ids[rows]
        has_mate = np.isin(batch_ids, gallery_ids)
        enrolled += int(has_mate.sum())
        kept += int((has_mate & is_mate.any(axis=1)).sum())
        for name, fusion in fusions.items():
            fused = (scores if name == primary else scores.refused(fusion)).fused
            running[name].add(fused.cpu().numpy().astype(np.float64), is_mate, has_mate)
        if options.operating is not None:
            primary_fused = scores.fused.cpu().numpy().astype(np.float64)
            fingers = scores.both_present.sum(-1).cpu().numpy()
            at_hit.add(primary_fused - hit_t[fingers], is_mate, has_mate)
            at_review.add(primary_fused - review_t[fingers], is_mate, has_mate)
    progress(stage, len(probes), len(probes))
    recall = None if search.shortlist is None or not enrolled else kept / enrolled
    operating = OperatingOutcomes(at_hit.done(), at_review.done()) if options.operating is not None else None
    return {name: r.done() for name, r in running.items()}, len(probes), recall, operating


def evaluate(
    dataset: Dataset, options: EvalOptions, params: MccParams | None = None, progress: Progress = _noop
) -> EvalResult:
    """Runs both experiments on ``dataset``."""
    params = params or MccParams()
    if options.fit_fusion:
        # Every probe finger of the fit meets at least a search-sized cohort of impostors.
        cohort = options.model.min_cohort if options.model else DEFAULT_MIN_COHORT
        options = replace(options, min_block=max(options.min_block, cohort + 1))
    pairs, block = verification_scores(dataset, params, options, progress)
    if options.fit_fusion:
        progress("fitting the evidence model", 0, 1)
        options = replace(
            options,
            model=fit_evidence_model(pairs, source=f"fedprint eval --fit-fusion on {len(pairs)} pairs"),
        )
    by_fusion, searches, recall, operating = identification(dataset, params, options, progress)
    by_size: dict[int, metrics.SearchOutcomes] | None = None
    if options.gallery_sizes:
        primary = options.fusions[0]
        by_size = {len(dataset.gallery): by_fusion[primary]}
        single = replace(options, fusions=(primary,), operating=None)
        for size in sorted(set(options.gallery_sizes)):
            if size < len(dataset.gallery):
                rng = np.random.default_rng([options.seed, 3, size])
                keep = sorted(rng.choice(len(dataset.gallery), size, replace=False).tolist())
                subset = replace(dataset, gallery=tuple(dataset.gallery[i] for i in keep))
                by_size[size] = identification(subset, params, single, progress)[0][primary]
    return EvalResult(
        block_size=block,
        pairs=pairs,
        by_fusion=by_fusion,
        fusion=options.fusions[0],
        model=options.model or shipped_model(),
        gallery_size=len(dataset.gallery),
        searches=searches,
        probe_captures=len(dataset.probes),
        templates=dataset.templates,
        shortlist=options.shortlist if recall is not None else None,
        shortlist_mate_recall=recall,
        by_gallery_size=by_size,
        calibration=options.calibration,
        operating=operating,
        operating_calibration=options.operating,
    )


def _key(rate: float) -> str:
    return f"{rate:g}"


def _interval(iv: metrics.Interval) -> list[float]:
    return [round(iv.low, 6), round(iv.high, 6)]


def summary(result: EvalResult) -> dict[str, Any]:
    """The JSON report: every figure with the counts it rests on and 95 % Wilson intervals.

    An interval reflects the sampling of the genuine (or mated) side at a fixed threshold; the
    threshold's own uncertainty, set by the impostor sample, is not in it.
    """
    out: dict[str, Any] = {
        "genuine_pairs": int(result.genuine.size),
        "impostor_pairs": int(result.impostor.size),
        "impostor_sampling": (
            "all cross-subject pairs within seeded blocks of "
            f"{result.block_size} subjects per finger position"
        ),
        "templates": result.templates,
        "gallery_size": result.gallery_size,
        "probe_captures": result.probe_captures,
        "searches": result.searches,
        "mated_searches": result.outcomes.mated,
        "nonmated_searches": result.outcomes.nonmated,
        "nonmated_note": "leave-mate-out: each mated search with its mate removed, plus unenrolled probes",
        "search_tiers": "exhaustive"
        if result.shortlist is None
        else f"shortlist of {result.shortlist} + full MCC",
        "shortlist_mate_recall": result.shortlist_mate_recall,
        "confidence": 0.95,
    }
    if result.genuine.size and result.impostor.size:
        eer = metrics.equal_error_rate(result.genuine, result.impostor)
        value = max(eer.false_accept, eer.false_reject)
        out["eer"] = value
        out["eer_threshold"] = eer.threshold
        out["eer_ci"] = _interval(
            metrics.wilson_interval(round(value * result.genuine.size), result.genuine.size)
        )
        fnmr: dict[str, float | None] = {}
        detail: dict[str, Any] = {}
        for target in FMR_TARGETS:
            point = metrics.fnmr_at_fmr(result.genuine, result.impostor, target)
            fnmr[_key(target)] = None if point is None else point.false_reject
            if point is not None:
                misses = round(point.false_reject * result.genuine.size)
                detail[_key(target)] = {
                    "threshold": point.threshold,
                    "fmr": point.false_accept,
                    "fnmr_ci": _interval(metrics.wilson_interval(misses, result.genuine.size)),
                }
        out["fnmr_at_fmr"] = fnmr
        out["fnmr_at_fmr_detail"] = detail
    else:
        out["eer"] = None
        out["fnmr_at_fmr"] = {_key(t): None for t in FMR_TARGETS}
    if result.operating is not None and result.operating_calibration is not None:
        out["operating_point"] = operating_summary(
            result.operating, result.operating_calibration, result.gallery_size
        )
    out.update(identification_summary(result.outcomes))
    out["fusion"] = result.fusion
    out["fusions"] = {name: identification_summary(oc) for name, oc in result.by_fusion.items()}
    out["single_finger_tail"] = finger_tail(result.pairs, result.model)
    if result.by_gallery_size is not None and result.calibration is not None:
        out["calibration_check"] = calibration_check(result.by_gallery_size, result.calibration)
    # Each pair of distributions shares its bins, sized to where its scores lie, so the two can
    # be drawn on one axis.
    oc = result.outcomes
    low, high = metrics.histogram_range(result.genuine, result.impostor)
    search_low, search_high = metrics.histogram_range(oc.mate_scores, oc.nonmated_top_scores)
    out["histograms"] = {
        "genuine": metrics.histogram(result.genuine, upper=high, lower=low),
        "impostor": metrics.histogram(result.impostor, upper=high, lower=low),
        "mated": metrics.histogram(oc.mate_scores, upper=search_high, lower=search_low),
        "nonmated_top": metrics.histogram(oc.nonmated_top_scores, upper=search_high, lower=search_low),
    }
    return out


def identification_summary(oc: metrics.SearchOutcomes) -> dict[str, Any]:
    """FNIR at each FPIR target with its interval, the threshold, and how many non-mated
    searches score at or above that threshold (the evidence the threshold rests on; fewer than
    :data:`THIN_THRESHOLD` is flagged), plus rank-1."""
    fnir: dict[str, float | None] = {}
    fnir_detail: dict[str, Any] = {}
    for target in FPIR_TARGETS:
        point = metrics.fnir_at_fpir(oc, target)
        fnir[_key(target)] = None if point is None else point.false_reject
        if point is not None:
            misses = round(point.false_reject * oc.mated)
            above = int(np.sum(oc.nonmated_top_scores >= point.threshold))
            # The next non-mated score below the threshold: the threshold lies between the two.
            below = oc.nonmated_top_scores[oc.nonmated_top_scores < point.threshold]
            fnir_detail[_key(target)] = {
                "threshold": point.threshold,
                "fpir": point.false_accept,
                "fnir_ci": _interval(metrics.wilson_interval(misses, oc.mated)),
                "nonmated_at_or_above": above,
                "nonmated_next_below": float(below.max()) if below.size else None,
                "thin": above < THIN_THRESHOLD,
            }
    out: dict[str, Any] = {"fnir_at_fpir": fnir, "fnir_at_fpir_detail": fnir_detail}
    if oc.mated:
        rank1 = metrics.rank_one_rate(oc)
        out["rank1"] = rank1.value
        out["rank1_ci"] = _interval(rank1)
    else:
        out["rank1"] = None
    return out


def operating_summary(
    operating: OperatingOutcomes, calibration: Thresholds, gallery_size: int
) -> dict[str, Any]:
    """Accuracy as a node decides at its own thresholds: FNIR (the mate not the candidate that
    carries a HIT; not even first in the review band) and the measured FPIR of non-mated
    searches (any candidate at or above its hit or review threshold), each with a 95 % Wilson
    interval, beside the FPIR the calibration states for the gallery size."""
    at_size = calibration.for_gallery(gallery_size)
    out: dict[str, Any] = {
        "calibration": calibration.source,
        "calibration_digest": calibration_digest(calibration),
        "gallery_size": gallery_size,
        "thresholds_10_fingers": {"hit": at_size.hit, "review": at_size.review},
    }
    for band, oc, stated in (
        ("hit", operating.hit, calibration.hit_fpir),
        ("review", operating.review, calibration.review_fpir),
    ):
        missed = round(metrics.fnir_at_threshold(oc, 0.0) * oc.mated) if oc.mated else 0
        above = int(np.sum(oc.nonmated_top_scores >= 0.0))
        out[band] = {
            "stated_fpir": stated,
            "mated_searches": oc.mated,
            "fnir": missed / oc.mated if oc.mated else None,
            "fnir_ci": _interval(metrics.wilson_interval(missed, oc.mated)) if oc.mated else None,
            "nonmated_searches": oc.nonmated,
            "nonmated_at_or_above": above,
            "fpir": above / oc.nonmated if oc.nonmated else None,
            "fpir_ci": _interval(metrics.wilson_interval(above, oc.nonmated)) if oc.nonmated else None,
        }
    return out


def calibration_check(
    by_size: dict[int, metrics.SearchOutcomes], calibration: Thresholds
) -> list[dict[str, Any]]:
    """Predicted against measured FPIR: at each gallery size, the thresholds the calibration
    gives for its hit and review FPIRs, and the share of non-mated searches at or above them
    (with a 95 % Wilson interval), and the FNIR there."""
    rows = []
    for size, oc in sorted(by_size.items()):
        at_size = calibration.for_gallery(size)
        for target, threshold in ((at_size.hit_fpir, at_size.hit), (at_size.review_fpir, at_size.review)):
            if not oc.nonmated:
                continue
            above = int(np.sum(oc.nonmated_top_scores >= threshold))
            measured = metrics.wilson_interval(above, oc.nonmated)
            rows.append(
                {
                    "gallery_size": size,
                    "predicted_fpir": target,
                    "threshold": round(threshold, 6),
                    "nonmated_searches": oc.nonmated,
                    "nonmated_at_or_above": above,
                    "measured_fpir": measured.value,
                    "measured_fpir_ci": _interval(measured),
                    "mated_searches": oc.mated,
                    "fnir": metrics.fnir_at_threshold(oc, threshold) if oc.mated else None,
                }
            )
    return rows


def finger_tail(pairs: PairScores, model: EvidenceModel, quantile: float = 0.999) -> dict[str, Any]:
    """The ``quantile`` of single-finger impostor scores for probe fingers with few
    (<= :data:`FEW_MINUTIAE`) and many (>= :data:`MANY_MINUTIAE`) minutiae, raw and as the evidence
    model's normalised z: a score that means the same whatever the counts has equal tails."""
    impostor = ~pairs.genuine
    few = impostor & (pairs.probe_minutiae <= FEW_MINUTIAE)
    many = impostor & (pairs.probe_minutiae >= MANY_MINUTIAE)
    z = normalised_pair_scores(pairs, model) if len(pairs) else np.zeros(0)

    def tail(values: metrics.FloatArray) -> float | None:
        return float(np.quantile(values, quantile)) if values.size else None

    return {
        "quantile": quantile,
        "impostor_pairs": {"few_minutiae": int(few.sum()), "many_minutiae": int(many.sum())},
        "raw": {"few_minutiae": tail(pairs.score[few]), "many_minutiae": tail(pairs.score[many])},
        "normalised": {"few_minutiae": tail(z[few]), "many_minutiae": tail(z[many])},
    }


def det_plot(result: EvalResult, path: Path) -> None:
    """DET curves (1:1 FNMR vs FMR, 1:N FNIR vs FPIR) on log axes, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    floor = 1e-5
    if result.genuine.size and result.impostor.size:
        _, fmr, fnmr = metrics.error_rates(result.genuine, result.impostor)
        ax.plot(np.maximum(fmr, floor), np.maximum(fnmr, floor), label="1:1 single finger (FNMR vs FMR)")
    oc = result.outcomes
    if oc.mated and oc.nonmated:
        thresholds = np.unique(oc.nonmated_top_scores)
        fpir = np.array([np.mean(oc.nonmated_top_scores >= t) for t in thresholds])
        fnir = np.array([metrics.fnir_at_threshold(oc, float(t)) for t in thresholds])
        ax.plot(np.maximum(fpir, floor), np.maximum(fnir, floor), label="1:N ten-print (FNIR vs FPIR)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false accept rate (FMR / FPIR)")
    ax.set_ylabel("false reject rate (FNMR / FNIR)")
    ax.set_title("DET (values below 1e-5 drawn at 1e-5)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
