"""Thresholds from 1:N search scores, written into the node configuration the servers read.

The hit threshold is the lowest fused score at which at most ``hit_fpir`` of the non-mated
searches put a candidate at or above it; the review threshold is the same at ``review_fpir``
(a looser rate, so it lies at or below the hit threshold): candidates between the two go to an
examiner. The curve of (FPIR, threshold) points lets a node honour a per-request target FPIR.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from evaluation import metrics
from evaluation.calibration import Thresholds
from evaluation.run import CURVE_FPIRS


class CalibrationError(ValueError):
    """The searches cannot support the asked-for rates (too few non-mated searches)."""


def calibrate(
    outcomes: metrics.SearchOutcomes, *, hit_fpir: float = 1e-3, review_fpir: float = 1e-2, source: str
) -> Thresholds:
    """Hit and review thresholds at the given FPIRs, and the FPIR curve, from 1:N outcomes."""
    if review_fpir < hit_fpir:
        raise CalibrationError(f"review FPIR {review_fpir} must be at least the hit FPIR {hit_fpir}")
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
        fpir_curve=[(f, round(t, 6)) for f, t in metrics.fpir_curve(outcomes, CURVE_FPIRS)],
    )


_SECTION = re.compile(r"^thresholds:[^\n]*\n(?:(?:[ \t]+[^\n]*|[ \t]*)\n)*", re.MULTILINE)


def write_thresholds(path: Path, thresholds: Thresholds) -> None:
    """Replaces (or appends) the ``thresholds:`` section of the YAML file at ``path``.

    Text surgery rather than a YAML round trip, so the file's other settings and comments
    survive; the file is created when missing. The result is checked to parse back.
    """
    data = thresholds.model_dump(mode="json")
    data["fpir_curve"] = [list(point) for point in data["fpir_curve"]]
    block = yaml.safe_dump({"thresholds": data}, sort_keys=False, default_flow_style=None)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: block, text, count=1)
    else:
        text = text + ("" if not text or text.endswith("\n") else "\n") + block
    loaded = yaml.safe_load(text)
    Thresholds.model_validate(loaded["thresholds"])
    path.write_text(text, encoding="utf-8")
