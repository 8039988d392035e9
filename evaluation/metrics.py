"""Accuracy metrics of a fingerprint matcher, on plain numpy arrays of scores.

Conventions (ISO/IEC 19795-1 and NIST FpVTE wording): higher scores mean more similar; a
comparison is *accepted* at threshold ``t`` when ``score >= t``.

- 1:1 (verification): FMR(t) = share of impostor scores >= t; FNMR(t) = share of genuine
  scores < t. EER is ``min over t of max(FMR(t), FNMR(t))``: the smallest error level at which
  one threshold keeps both rates at or below it. That is the conservative (upper) reading of
  the crossing point; on finite samples it never flatters the matcher by interpolating.
- 1:N (identification, candidate list of length 1, as the gallery nodes decide on their top
  candidate): FPIR(T) = share of non-mated searches whose top score is >= T; FNIR(T) = share of
  mated searches whose mate is not ranked first with a score >= T. A mate tied with a non-mate
  is not ranked first (ties never count in the matcher's favour).

Operating points are taken at the *lowest* threshold that meets the target false-match rate,
which gives the best FNMR/FNIR the target allows. A target below ``1 / n_impostor`` cannot be
resolved from the sample and is reported as ``None`` rather than guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: z for a two-sided 95 % interval.
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A proportion with its two-sided 95 % Wilson score interval and the count it rests on."""

    value: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class OperatingPoint:
    """Where a threshold lands: the false-accept side (FMR or FPIR), the false-reject side
    (FNMR or FNIR) and the threshold itself."""

    threshold: float
    false_accept: float
    false_reject: float


def wilson_interval(successes: int, n: int, z: float = _Z95) -> Interval:
    """Wilson score interval of a binomial proportion; well behaved at 0 and 1, unlike the normal one."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(value=p, low=max(0.0, centre - half), high=min(1.0, centre + half), n=n)


def _as_scores(scores: npt.ArrayLike, what: str) -> FloatArray:
    a = np.asarray(scores, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"no {what} scores")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} scores hold NaN or infinity")
    return a


def error_rates(genuine: npt.ArrayLike, impostor: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(thresholds, fmr, fnmr)`` at every distinct score, plus one threshold above them all.

    Thresholds ascend, so FMR descends and FNMR ascends. The curve the DET plot draws.
    """
    g = np.sort(_as_scores(genuine, "genuine"))
    i = np.sort(_as_scores(impostor, "impostor"))
    scores = np.unique(np.concatenate([g, i]))
    thresholds = np.append(scores, np.nextafter(scores[-1], np.inf))
    # searchsorted 'left' counts the scores strictly below each threshold.
    fnmr = np.searchsorted(g, thresholds, side="left") / g.size
    fmr = 1.0 - np.searchsorted(i, thresholds, side="left") / i.size
    return thresholds, fmr, fnmr


def equal_error_rate(genuine: npt.ArrayLike, impostor: npt.ArrayLike) -> OperatingPoint:
    """The EER operating point: the threshold minimising ``max(FMR, FNMR)`` (see module doc)."""
    thresholds, fmr, fnmr = error_rates(genuine, impostor)
    worst = np.maximum(fmr, fnmr)
    k = int(np.argmin(worst))
    return OperatingPoint(
        threshold=float(thresholds[k]), false_accept=float(fmr[k]), false_reject=float(fnmr[k])
    )


def threshold_at_rate(negatives: npt.ArrayLike, target: float) -> float | None:
    """The lowest threshold at which at most ``target`` of ``negatives`` are accepted.

    ``negatives`` are impostor scores (for FMR) or top non-mated search scores (for FPIR).
    With ``k = floor(target * n)`` allowed false accepts, the threshold lies just above the
    (k+1)-th highest negative. None when ``target < 1/n``: the sample cannot tell.
    """
    neg = np.sort(_as_scores(negatives, "negative"))[::-1]
    if not 0.0 < target < 1.0:
        raise ValueError(f"target rate {target} outside (0, 1)")
    allowed = math.floor(target * neg.size + 1e-9)
    if allowed < 1:
        return None
    if allowed >= neg.size:
        return float(neg[-1])
    return float(np.nextafter(neg[allowed], np.inf))


def fnmr_at_fmr(genuine: npt.ArrayLike, impostor: npt.ArrayLike, target: float) -> OperatingPoint | None:
    """FNMR at the lowest threshold whose FMR is at most ``target`` (None if not resolvable)."""
    g = _as_scores(genuine, "genuine")
    i = _as_scores(impostor, "impostor")
    t = threshold_at_rate(i, target)
    if t is None:
        return None
    return OperatingPoint(
        threshold=t, false_accept=float(np.mean(i >= t)), false_reject=float(np.mean(g < t))
    )


@dataclass(frozen=True)
class SearchOutcomes:
    """1:N searches reduced to what the metrics need.

    - ``mate_scores``: ``[Nm]`` score of the mate in each mated search;
    - ``best_nonmate_scores``: ``[Nm]`` highest non-mate score in that same search (what the
      mate must beat to rank first; ``-inf`` for a gallery of one);
    - ``nonmated_top_scores``: ``[Nn]`` top score of each non-mated search.
    """

    mate_scores: FloatArray
    best_nonmate_scores: FloatArray
    nonmated_top_scores: FloatArray

    @property
    def mated(self) -> int:
        return int(self.mate_scores.size)

    @property
    def nonmated(self) -> int:
        return int(self.nonmated_top_scores.size)


def rank_one_rate(outcomes: SearchOutcomes) -> Interval:
    """Share of mated searches whose mate strictly outscores every non-mate."""
    hits = int(np.sum(outcomes.mate_scores > outcomes.best_nonmate_scores))
    return wilson_interval(hits, outcomes.mated)


def fnir_at_threshold(outcomes: SearchOutcomes, threshold: float) -> float:
    """FNIR at ``threshold`` for a candidate list of one: the mate is missing, outranked, or below it."""
    found = (outcomes.mate_scores > outcomes.best_nonmate_scores) & (outcomes.mate_scores >= threshold)
    return float(1.0 - np.mean(found))


def fnir_at_fpir(outcomes: SearchOutcomes, target: float) -> OperatingPoint | None:
    """FNIR at the lowest threshold whose FPIR over the non-mated searches is at most ``target``."""
    if outcomes.mated == 0 or outcomes.nonmated == 0:
        return None
    t = threshold_at_rate(outcomes.nonmated_top_scores, target)
    if t is None:
        return None
    fpir = float(np.mean(outcomes.nonmated_top_scores >= t))
    return OperatingPoint(threshold=t, false_accept=fpir, false_reject=fnir_at_threshold(outcomes, t))


def fpir_curve(outcomes: SearchOutcomes, targets: tuple[float, ...]) -> list[tuple[float, float]]:
    """``(fpir, threshold)`` points for each resolvable target, the form ``Thresholds.fpir_curve`` takes."""
    points = []
    for target in targets:
        t = threshold_at_rate(outcomes.nonmated_top_scores, target)
        if t is not None:
            points.append((float(np.mean(outcomes.nonmated_top_scores >= t)), t))
    return points


def histogram(
    scores: npt.ArrayLike, bins: int = 50, upper: float = 1.0, lower: float = 0.0
) -> dict[str, list[float] | list[int]]:
    """Counts of the finite ``scores`` in ``bins`` equal bins over [lower, upper]; scores outside
    are counted in the outer bins (MCC scores lie in [0, 1]; fused LLRs on either side of 0)."""
    values = np.asarray(scores, np.float64)
    clipped = np.clip(values[np.isfinite(values)], lower, upper)
    counts, edges = np.histogram(clipped, bins=bins, range=(lower, upper))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def histogram_range(*groups: npt.ArrayLike) -> tuple[float, float]:
    """``(lower, upper)`` edges that show where the finite scores of all ``groups`` lie: from the
    1st percentile of the lowest group (0 for non-negative scores) to the 99th of the highest, so
    that a long tail does not squeeze the other group's peak into one bin."""
    finite = [a[np.isfinite(a)] for a in (np.asarray(g, np.float64) for g in groups)]
    finite = [a for a in finite if a.size]
    if not finite:
        return 0.0, 1.0
    low = min(0.0, *(float(np.quantile(a, 0.01)) for a in finite))
    high = max(float(np.quantile(a, 0.99)) for a in finite)
    if low >= 0.0:
        return 0.0, min(1.0, max(1e-6, high) * 1.1) if high <= 1.0 else high * 1.1
    span = max(high - low, 1e-6)
    return low - 0.05 * span, high + 0.05 * span
