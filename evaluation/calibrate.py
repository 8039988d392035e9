"""Thresholds from impostor scores, written into the node configuration the servers read.

With a :class:`TailModel` (``fedprint eval --calibrate``): the share ``r(t)`` of impostor
subject pairs scoring at least ``t`` is measured on the 1:1 blocks' ten-print pairs and its far
tail fitted (:func:`fit_tail`); a node then sets, for its own gallery size N, the hit threshold
where ``1 - (1 - r)^N`` equals ``hit_fpir`` and the review threshold likewise at ``review_fpir``
(a looser rate, so at or below the hit threshold): candidates between the two go to an examiner.

Without one, the thresholds are the empirical ones of the 1:N searches (the lowest fused score
at which at most ``hit_fpir`` of the non-mated searches put a candidate at or above it), which
hold only at the gallery size of the run. The curve of (FPIR, threshold) points of the searches
is kept either way, for reference.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import yaml

from evaluation import metrics
from evaluation.calibration import TailModel, Thresholds
from evaluation.run import CURVE_FPIRS

#: Share of impostor pairs in the fitted tail, and the fewest pairs it may rest on.
TAIL_SHARE, MIN_TAIL = 0.01, 300
#: Rates of the tail model's measured body (above the fitted tail).
BODY_RATES = (0.5, 0.2, 0.1, 0.05, 0.02)


class CalibrationError(ValueError):
    """The searches cannot support the asked-for rates (too few non-mated searches)."""


def fit_gpd(excess: metrics.FloatArray) -> tuple[float, float]:
    """``(scale, shape)`` of a generalised Pareto distribution fitted to positive excesses by
    probability-weighted moments (Hosking and Wallis, 1987): closed form, and steadier than
    maximum likelihood on the few hundred points a tail offers. The shape is clipped to
    [0, 0.5]: at most as heavy as the estimator is well behaved for, and never bounded. A
    negative shape would end the tail at a finite score, and a score past that end (one finger's
    evidence reaches 9 and more) would be a hit at any gallery size; a few hundred points cannot
    show that impostors never score higher, so the fit keeps the exponential (shape 0) instead.
    With shape 0 the scale is the excesses' mean (the maximum-likelihood exponential fit)."""
    y = np.sort(np.asarray(excess, np.float64))
    n = y.size
    if n < 10 or not np.all(y >= 0) or y.mean() <= 0:
        raise CalibrationError(f"a tail fit needs at least 10 positive excesses, got {n}")
    a0 = float(y.mean())
    a1 = float(np.sum(y * (n - 1 - np.arange(n)) / (n - 1)) / n)
    k = a0 / (a0 - 2 * a1) - 2.0  # Hosking's kappa; the usual shape is -kappa
    shape = float(np.clip(-k, 0.0, 0.5))
    scale = 2 * a0 * a1 / (a0 - 2 * a1) if shape > 0.0 else a0
    return float(max(scale, 1e-9)), shape


def fit_tail(
    impostor: metrics.FloatArray, *, tail_share: float = TAIL_SHARE, min_tail: int = MIN_TAIL
) -> TailModel:
    """The :class:`TailModel` of impostor subject-pair scores: measured body, fitted tail."""
    scores = np.sort(np.asarray(impostor, np.float64))[::-1]
    n = scores.size
    k = max(min_tail, math.ceil(tail_share * n))
    if n < 2 * k:
        raise CalibrationError(f"{n} impostor pairs are too few for a tail of {k}: need {2 * k}")
    threshold = float(scores[k])
    exceedance = k / n
    scale, shape = fit_gpd(scores[:k] - threshold)
    body: list[tuple[float, float]] = []
    for rate in BODY_RATES:
        if rate > exceedance:
            score = float(scores[int(rate * n)])
            if not body or score > body[-1][0]:
                body.append((score, rate))
    body = [(s, r) for s, r in body if s < threshold] + [(threshold, exceedance)]
    if len(body) < 2:
        body.insert(0, (float(scores[-1]), 1.0 - 1e-9))
    return TailModel(
        body=body,
        exceedance=exceedance,
        threshold=threshold,
        scale=scale,
        shape=shape,
        pairs=n,
        tail_pairs=k,
    )


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


_SECTION = re.compile(r"^thresholds:[^\n]*\n(?:(?:[ \t]+[^\n]*|[ \t]*)\n)*", re.MULTILINE)


def write_thresholds(path: Path, thresholds: Thresholds) -> None:
    """Replaces (or appends) the ``thresholds:`` section of the YAML file at ``path``.

    Text surgery rather than a YAML round trip, so the file's other settings and comments
    survive; the file is created when missing. The result is checked to parse back.
    """
    data = thresholds.model_dump(mode="json", exclude_none=True)
    data["fpir_curve"] = [list(point) for point in data["fpir_curve"]]
    for tail in data.get("tails", []):
        tail["body"] = [list(point) for point in tail["body"]]
    block = yaml.safe_dump({"thresholds": data}, sort_keys=False, default_flow_style=None)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: block, text, count=1)
    else:
        text = text + ("" if not text or text.endswith("\n") else "\n") + block
    loaded = yaml.safe_load(text)
    Thresholds.model_validate(loaded["thresholds"])
    path.write_text(text, encoding="utf-8")
