"""Thresholds from impostor scores, written into the node configuration the servers read.

With a :class:`TailModel` (``fedprint eval --calibrate``): the share ``r(t)`` of impostor
subject pairs scoring at least ``t`` is measured on the 1:1 blocks' ten-print pairs and its far
tail fitted (:func:`calibration.tails.fit_tail`); a node then sets, for its own gallery size N,
the hit threshold where ``1 - (1 - r)^N`` equals ``hit_fpir`` and the review threshold likewise
at ``review_fpir`` (a looser rate, so at or below the hit threshold): candidates between the two
go to an examiner.

Without one, the thresholds are the empirical ones of the 1:N searches (the lowest fused score
at which at most ``hit_fpir`` of the non-mated searches put a candidate at or above it), which
hold only at the gallery size of the run. The curve of (FPIR, threshold) points of the searches
is kept either way, for reference.
"""

from __future__ import annotations

from calibration.tails import CalibrationError
from calibration.thresholds import TailModel, Thresholds
from evaluation import metrics
from evaluation.run import CURVE_FPIRS


def calibrate(
    outcomes: metrics.SearchOutcomes,
    *,
    hit_fpir: float = 1e-3,
    review_fpir: float = 1e-2,
    source: str,
    tails: list[TailModel] | None = None,
    gallery_size: int = 1,
) -> Thresholds:
    """Hit and review thresholds at the given FPIRs: from ``tails`` (one per number of fingers
    compared; for ``gallery_size`` and ten fingers, and for any size and count a node meets
    later) when given, else from the 1:N outcomes; with the searches' FPIR curve either way."""
    if review_fpir < hit_fpir:
        raise CalibrationError(f"review FPIR {review_fpir} must be at least the hit FPIR {hit_fpir}")
    curve = (
        [(f, round(t, 6)) for f, t in metrics.fpir_curve(outcomes, CURVE_FPIRS)] if outcomes.nonmated else []
    )
    if tails:
        base = Thresholds(
            hit=0.0,
            review=0.0,
            hit_fpir=hit_fpir,
            review_fpir=review_fpir,
            source=source,
            fpir_curve=curve,
            tails=tails,
        )
        return base.for_gallery(gallery_size)
    hit = metrics.threshold_at_rate(outcomes.nonmated_top_scores, hit_fpir)
    review = metrics.threshold_at_rate(outcomes.nonmated_top_scores, review_fpir)
    if hit is None or review is None:
        raise CalibrationError(
            f"{outcomes.nonmated} non-mated searches cannot resolve FPIR {hit_fpir}: "
            f"need at least {round(1 / hit_fpir)}"
        )
    return Thresholds(
        hit=round(hit, 6),
        review=round(min(review, hit), 6),
        hit_fpir=hit_fpir,
        review_fpir=review_fpir,
        source=source,
        fpir_curve=curve,
    )
