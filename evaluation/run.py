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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation import metrics
from gpu_kernels import (
    MccParams,
    TenPrintCylinders,
    encode_fingers,
    encode_tenprints,
    score_fingers,
    score_tenprints,
)
from gpu_kernels.shortlist import ShortlistIndex, score_shortlisted, subject_descriptors
from minutiae.dataset import Capture, Dataset
from minutiae.template import FingerTemplate

FMR_TARGETS = (1e-2, 1e-3, 1e-4)
FPIR_TARGETS = (1e-2, 1e-3)
#: Points of the calibration curve written into node configs (for per-request target FPIR).
CURVE_FPIRS = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4)

Progress = Callable[[str, int, int], None]


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


@dataclass(frozen=True)
class EvalResult:
    """Raw scores of both experiments; :func:`summary` turns them into the JSON report."""

    genuine: metrics.FloatArray
    impostor: metrics.FloatArray
    block_size: int
    outcomes: metrics.SearchOutcomes
    gallery_size: int
    searches: int
    probe_captures: int
    templates: int
    #: Shortlist length of the 1:N searches (None: exhaustive) and the share of mated searches
    #: whose mate it kept.
    shortlist: int | None = None
    shortlist_mate_recall: float | None = None


def _noop(stage: str, done: int, total: int) -> None:
    pass


def verification_scores(
    dataset: Dataset, params: MccParams, options: EvalOptions, progress: Progress = _noop
) -> tuple[metrics.FloatArray, metrics.FloatArray, int]:
    """``(genuine, impostor, block_size)`` single-finger scores, sampled as the module doc says."""
    rng = np.random.default_rng([options.seed, 1])
    subjects = sorted({c.subject_id for c in dataset.probes} & {c.subject_id for c in dataset.gallery})
    if not subjects:
        return np.zeros(0), np.zeros(0), 1
    index = {s: i for i, s in enumerate(subjects)}
    # Expected genuine pairs per subject, to size blocks for the impostor count asked for.
    per_subject = max(
        1.0,
        sum(len(c.tenprint.fingers) for c in dataset.probes if c.subject_id in index) / len(subjects),
    )
    genuine_total = per_subject * len(subjects)
    block = int(min(len(subjects), max(1, 1 + math.ceil(options.impostor_pairs / genuine_total))))
    genuine: list[metrics.FloatArray] = []
    impostor: list[metrics.FloatArray] = []
    for position in range(1, 11):
        progress("1:1 single finger", position - 1, 10)
        probe_fingers = _fingers(dataset.probes, position, index)
        gallery_fingers = _fingers(dataset.gallery, position, index)
        if not probe_fingers[0] or not gallery_fingers[0]:
            continue
        left = encode_fingers(probe_fingers[0], params, options.device)
        right = encode_fingers(gallery_fingers[0], params, options.device)
        left_subject, right_subject = np.array(probe_fingers[1]), np.array(gallery_fingers[1])
        order = rng.permutation(len(subjects))
        for lo in range(0, len(subjects), block):
            members = order[lo : lo + block]
            li = np.flatnonzero(np.isin(left_subject, members))
            ri = np.flatnonzero(np.isin(right_subject, members))
            if not len(li) or not len(ri):
                continue
            scores = score_fingers(
                left.select(torch.from_numpy(li)), right.select(torch.from_numpy(ri)), params
            ).cpu()
            same = left_subject[li][:, None] == right_subject[ri][None, :]
            s = scores.numpy().astype(np.float64)
            genuine.append(s[same])
            impostor.append(s[~same])
    progress("1:1 single finger", 10, 10)
    return _concat(genuine), _concat(impostor), block


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
    ``(fused [P, K], gallery rows [P, K])`` with K the gallery size or the shortlist length."""

    def __init__(self, gallery: TenPrintCylinders, params: MccParams, shortlist: int | None) -> None:
        self.gallery = gallery
        self.params = params
        self.shortlist = shortlist if shortlist is not None and shortlist < len(gallery) else None
        self.index = (
            None
            if self.shortlist is None
            else ShortlistIndex.build(subject_descriptors(gallery), gallery.present)
        )

    def __call__(self, probes: TenPrintCylinders) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        if self.index is None or self.shortlist is None:
            fused = score_tenprints(probes, self.gallery, self.params).fused
            rows = np.broadcast_to(np.arange(len(self.gallery)), tuple(fused.shape))
            return fused.cpu().numpy().astype(np.float64), rows
        short = self.index.candidates(probes, self.shortlist)
        fused = score_shortlisted(probes, self.gallery, short, self.params).fused
        return fused.cpu().numpy().astype(np.float64), short.numpy()


def identification(
    dataset: Dataset, params: MccParams, options: EvalOptions, progress: Progress = _noop
) -> tuple[metrics.SearchOutcomes, int, float | None]:
    """1:N outcomes of the probe searches (all, or a seeded sample of ``options.searches``), the
    number of searches, and (with a shortlist) the share of mated searches whose mate it kept."""
    probes = list(dataset.probes)
    if options.searches is not None and options.searches < len(probes):
        rng = np.random.default_rng([options.seed, 2])
        probes = [probes[i] for i in sorted(rng.choice(len(probes), options.searches, replace=False))]
    if not probes or not dataset.gallery:
        empty = np.zeros(0)
        return metrics.SearchOutcomes(empty, empty, empty), len(dataset.gallery), None
    progress("1:N encoding the gallery", 0, 1)
    gallery = encode_tenprints([c.tenprint for c in dataset.gallery], params, options.device)
    search = _Searcher(gallery, params, options.shortlist)
    gallery_ids = np.array([c.subject_id for c in dataset.gallery])
    mate: list[float] = []
    best_nonmate: list[float] = []
    nonmated: list[float] = []
    kept = enrolled = 0
    for lo in range(0, len(probes), options.probe_batch):
        progress("1:N ten-print", lo, len(probes))
        batch = probes[lo : lo + options.probe_batch]
        fused, rows = search(encode_tenprints([c.tenprint for c in batch], params, options.device))
        batch_ids = np.array([c.subject_id for c in batch])
        is_mate = batch_ids[:, None] == gallery_ids[rows]
        # A mate the shortlist did not pass on was not found: score 0, below any threshold.
        mate_score = np.where(is_mate, fused, -np.inf).max(axis=1, initial=-np.inf)
        nonmate_score = np.where(is_mate, -np.inf, fused).max(axis=1, initial=-np.inf)
        has_mate = np.isin(batch_ids, gallery_ids)
        found = is_mate.any(axis=1)
        enrolled += int(has_mate.sum())
        kept += int((has_mate & found).sum())
        mate.extend(np.where(found, mate_score, 0.0)[has_mate].tolist())
        best_nonmate.extend(np.maximum(nonmate_score, 0.0)[has_mate].tolist())
        # Leave-mate-out: the best non-mate is also the top of a non-mated search (if any non-mate).
        nonmated.extend(nonmate_score[np.isfinite(nonmate_score)].tolist())
    progress("1:N ten-print", len(probes), len(probes))
    outcomes = metrics.SearchOutcomes(np.array(mate), np.array(best_nonmate), np.array(nonmated))
    recall = None if search.shortlist is None or not enrolled else kept / enrolled
    return outcomes, len(probes), recall


def evaluate(
    dataset: Dataset, options: EvalOptions, params: MccParams | None = None, progress: Progress = _noop
) -> EvalResult:
    """Runs both experiments on ``dataset``."""
    params = params or MccParams()
    genuine, impostor, block = verification_scores(dataset, params, options, progress)
    outcomes, searches, recall = identification(dataset, params, options, progress)
    return EvalResult(
        genuine=genuine,
        impostor=impostor,
        block_size=block,
        outcomes=outcomes,
        gallery_size=len(dataset.gallery),
        searches=searches,
        probe_captures=len(dataset.probes),
        templates=dataset.templates,
        shortlist=options.shortlist if recall is not None else None,
        shortlist_mate_recall=recall,
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
    oc = result.outcomes
    fnir: dict[str, float | None] = {}
    fnir_detail: dict[str, Any] = {}
    for target in FPIR_TARGETS:
        point = metrics.fnir_at_fpir(oc, target)
        fnir[_key(target)] = None if point is None else point.false_reject
        if point is not None:
            misses = round(point.false_reject * oc.mated)
            fnir_detail[_key(target)] = {
                "threshold": point.threshold,
                "fpir": point.false_accept,
                "fnir_ci": _interval(metrics.wilson_interval(misses, oc.mated)),
            }
    out["fnir_at_fpir"] = fnir
    out["fnir_at_fpir_detail"] = fnir_detail
    if oc.mated:
        rank1 = metrics.rank_one_rate(oc)
        out["rank1"] = rank1.value
        out["rank1_ci"] = _interval(rank1)
    else:
        out["rank1"] = None
    # Each pair of distributions shares its bins, sized to where its scores lie (LSS-R scores
    # sit far below 1), so the two can be drawn on one axis.
    pair = metrics.histogram_range(result.genuine, result.impostor)
    search = metrics.histogram_range(oc.mate_scores, oc.nonmated_top_scores)
    out["histograms"] = {
        "genuine": metrics.histogram(result.genuine, upper=pair),
        "impostor": metrics.histogram(result.impostor, upper=pair),
        "mated": metrics.histogram(oc.mate_scores, upper=search),
        "nonmated_top": metrics.histogram(oc.nonmated_top_scores, upper=search),
    }
    return out


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
