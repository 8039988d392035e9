"""The far tail of impostor scores: a measured body and a generalised Pareto tail fitted above it
(:class:`calibration.thresholds.TailModel`), from any sample of impostor subject-pair scores:
labelled pairs of an evaluation (``fedprint eval --calibrate``) or the pairs a node learns from
its own gallery and traffic (:mod:`calibration.learning`).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from calibration.thresholds import TailModel

FloatArray = npt.NDArray[np.float64]

#: Share of impostor pairs in the fitted tail, and the fewest pairs it may rest on.
TAIL_SHARE, MIN_TAIL = 0.01, 300
#: Rates of the tail model's measured body (above the fitted tail).
BODY_RATES = (0.5, 0.2, 0.1, 0.05, 0.02)


class CalibrationError(ValueError):
    """The searches cannot support the asked-for rates (too few non-mated searches)."""


def fit_gpd(excess: FloatArray) -> tuple[float, float]:
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


def fit_tail(impostor: FloatArray, *, tail_share: float = TAIL_SHARE, min_tail: int = MIN_TAIL) -> TailModel:
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


def sums_by_fingers(llr: FloatArray, rng: np.random.Generator) -> list[FloatArray]:
    """For 1, 2, ... 10 fingers compared, the sum of one random n-finger subset of each row of
    ``llr [pairs, 10]`` (NaN: not compared) that has n fingers compared."""
    keys = np.where(np.isnan(llr), np.inf, rng.random(llr.shape))
    ordered = np.take_along_axis(np.nan_to_num(llr, nan=0.0), np.argsort(keys, axis=1), axis=1)
    running = np.cumsum(ordered, axis=1)
    common = (~np.isnan(llr)).sum(1)
    return [running[common >= n, n - 1] for n in range(1, 11)]
