"""Calibrated thresholds: what a fused score is compared against, and the FPIR it stands for.

`fedprint eval --calibrate` writes them (:mod:`evaluation.calibrate`); gallery nodes read
them, by default the calibration shipped beside this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

import yaml
from pydantic import BaseModel, Field, model_validator


class Thresholds(BaseModel):
    """Fused-score thresholds of a gallery node and what they were calibrated for."""

    hit: float = Field(ge=0.0, le=1.0, description="fused score at or above which a candidate is a hit")
    review: float = Field(ge=0.0, le=1.0, description="fused score at or above which an examiner reviews")
    hit_fpir: float = Field(default=1e-3, gt=0.0, lt=1.0)
    review_fpir: float = Field(default=1e-2, gt=0.0, lt=1.0)
    source: str = "configuration"
    fpir_curve: list[tuple[float, float]] = Field(
        default_factory=list,
        description="calibration points (fpir, threshold) from `fedprint eval --calibrate`, for target_fpir",
    )

    @model_validator(mode="after")
    def _review_below_hit(self) -> Self:
        if self.review > self.hit:
            raise ValueError(f"review threshold {self.review} is above hit threshold {self.hit}")
        return self

    def for_fpir(self, target: float) -> Self | None:
        """The thresholds with the hit threshold moved to reach ``target`` FPIR, or None without a curve.

        Picks the lowest calibrated threshold whose FPIR is at or below the target; the
        review threshold stays where it is unless it would lie above the hit threshold.
        """
        eligible = [threshold for fpir, threshold in self.fpir_curve if fpir <= target]
        if not eligible:
            return None
        hit = min(eligible)
        return self.model_copy(
            update={
                "hit": hit,
                "hit_fpir": target,
                "review": min(self.review, hit),
                "source": f"{self.source}+fpir",
            }
        )


#: Thresholds written by `fedprint eval --calibrate`, shipped with the package.
CALIBRATED_THRESHOLDS = Path(__file__).with_name("thresholds.yaml")


def calibrated_thresholds(path: Path = CALIBRATED_THRESHOLDS) -> Thresholds:
    """The ``thresholds:`` section of a calibration file (by default the one shipped)."""
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict) or "thresholds" not in loaded:
        raise ValueError(f"{path}: no thresholds section")
    return Thresholds.model_validate(loaded["thresholds"])
