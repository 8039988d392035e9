"""Calibrated thresholds: what a fused score is compared against, and the FPIR it stands for.

`fedprint eval --calibrate` writes them (:mod:`evaluation.calibrate`); gallery nodes read
them, by default the calibration shipped beside this module.

FPIR grows with the gallery: a search of N subjects is a false hit when any of N impostor
comparisons reaches the threshold, so with ``r(t)`` the share of single impostor subject pairs at
or above ``t``, ``FPIR(t, N) = 1 - (1 - r(t))^N``. A calibration therefore carries a
:class:`TailModel` of ``r`` (its body from measured quantiles, its far tail a fitted generalised
Pareto distribution, since FPIR 1e-3 at a million subjects needs ``r`` near 1e-9, far beyond any
sample), and a node derives its thresholds for its current gallery size with
:meth:`Thresholds.for_gallery`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import yaml
from pydantic import BaseModel, Field, model_validator

#: Gallery sizes at which a calibration is checked (:meth:`Thresholds.problems`): 10 to 10^9,
#: four to a decade.
CHECKED_GALLERY_SIZES: tuple[int, ...] = tuple(sorted({round(10 ** (1 + k / 4)) for k in range(33)}))


class TailModel(BaseModel):
    """``r(t)``: the share of impostor subject pairs whose fused score is at or above ``t``.

    Between the ``body`` points (score, rate), measured quantiles with rates from 0.5 down to
    ``exceedance``, ``log r`` is interpolated linearly; above ``threshold`` (the last body score)
    ``r(t) = exceedance · (1 + shape · (t - threshold) / scale)^(-1/shape)``, a generalised Pareto
    tail (``shape`` 0: exponential; negative: a bounded tail).
    """

    body: list[tuple[float, float]] = Field(min_length=2, description="(score, rate) points, rates falling")
    exceedance: float = Field(gt=0.0, lt=1.0, description="r at the tail's start")
    threshold: float = Field(allow_inf_nan=False, description="score where the fitted tail starts")
    scale: float = Field(gt=0.0, allow_inf_nan=False)
    # Never negative: a bounded tail ends at a finite score, past which anything is a hit at every
    # gallery size (see evaluation.calibrate.fit_gpd).
    shape: float = Field(ge=0.0, le=1.0, description="0: exponential tail; positive: heavier; never bounded")
    pairs: int = Field(gt=0, description="impostor subject pairs the model was fitted on")
    tail_pairs: int = Field(gt=0, description="of which in the fitted tail")

    @model_validator(mode="after")
    def _monotone(self) -> Self:
        scores = [s for s, _ in self.body]
        rates = [r for _, r in self.body]
        if (
            scores != sorted(scores)
            or rates != sorted(rates, reverse=True)
            or not all(0 < r < 1 for r in rates)
        ):
            raise ValueError("body points must rise in score and fall in rate within (0, 1)")
        if abs(scores[-1] - self.threshold) > 1e-9 or abs(rates[-1] - self.exceedance) > 1e-12:
            raise ValueError("the body must end where the tail starts")
        return self

    def rate(self, score: float) -> float:
        """``r(score)``."""
        if score >= self.threshold:
            excess = (score - self.threshold) / self.scale
            if abs(self.shape) < 1e-9:
                return self.exceedance * math.exp(-excess)
            base = 1.0 + self.shape * excess
            return 0.0 if base <= 0.0 else self.exceedance * base ** (-1.0 / self.shape)
        for (s0, r0), (s1, r1) in zip(self.body, self.body[1:], strict=False):
            if s0 <= score <= s1:
                return math.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * (score - s0) / (s1 - s0))
        return self.body[0][1]  # below the body: at least the body's first rate (0.5)

    def score_at(self, rate: float) -> float:
        """The score ``t`` with ``r(t) = rate`` (the lowest such, for rates above the body's first)."""
        if rate <= self.exceedance:
            ratio = rate / self.exceedance
            if abs(self.shape) < 1e-9:
                return self.threshold - self.scale * math.log(ratio)
            return self.threshold + self.scale * (math.pow(ratio, -self.shape) - 1.0) / self.shape
        for (s0, r0), (s1, r1) in zip(self.body, self.body[1:], strict=False):
            if r1 <= rate <= r0:
                return s0 + (s1 - s0) * (math.log(rate) - math.log(r0)) / (math.log(r1) - math.log(r0))
        return self.body[0][0]

    def threshold_for(self, fpir: float, gallery_size: int) -> float:
        """The score at which a search of ``gallery_size`` impostors has FPIR ``fpir``."""
        per_pair = -math.expm1(math.log1p(-fpir) / max(1, gallery_size))
        return self.score_at(per_pair)

    def fpir(self, score: float, gallery_size: int) -> float:
        """FPIR of threshold ``score`` in a search of ``gallery_size`` subjects."""
        return -math.expm1(max(1, gallery_size) * math.log1p(-min(self.rate(score), 1.0 - 1e-16)))


class Thresholds(BaseModel):
    """Fused-score thresholds of a gallery node and what they were calibrated for."""

    # Fused scores are log-likelihood ratios (evidence fusion) or means in [0, 1] (the older
    # fusion): any finite value can be a threshold.
    hit: float = Field(allow_inf_nan=False, description="fused score at or above which a candidate is a hit")
    review: float = Field(
        allow_inf_nan=False, description="fused score at or above which an examiner reviews"
    )
    hit_fpir: float = Field(default=1e-3, gt=0.0, lt=1.0)
    review_fpir: float = Field(default=1e-2, gt=0.0, lt=1.0)
    source: str = "configuration"
    fpir_curve: list[tuple[float, float]] = Field(
        default_factory=list,
        description="calibration points (fpir, threshold) from `fedprint eval --calibrate`, for target_fpir",
    )
    tails: list[TailModel] = Field(
        default_factory=list,
        max_length=10,
        description="impostor pair score tails for 1, 2, ... fingers compared: thresholds follow the "
        "gallery size and the fingers compared when set",
    )
    gallery_size: int | None = Field(
        default=None,
        ge=0,
        description="gallery size hit and review were derived for (None: fixed thresholds)",
    )
    fingers: int | None = Field(
        default=None, ge=1, le=10, description="fingers compared that hit and review were derived for"
    )
    evidence_model: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{16}$",
        description="digest of the evidence model whose fused scores these thresholds were fitted on "
        "(gpu_kernels.evidence.model_digest); a node refuses to judge another model's scores by them",
    )

    @model_validator(mode="after")
    def _review_below_hit(self) -> Self:
        if self.review > self.hit:
            raise ValueError(f"review threshold {self.review} is above hit threshold {self.hit}")
        return self

    @model_validator(mode="after")
    def _a_tail_per_finger_count(self) -> Self:
        if self.tails and len(self.tails) != 10:
            raise ValueError(f"need a tail for each of 1-10 fingers compared, got {len(self.tails)}")
        return self

    def tail(self, fingers: int = 10) -> TailModel | None:
        """The tail for searches comparing ``fingers`` fingers (clipped to 1-10), if calibrated."""
        return self.tails[min(10, max(1, fingers)) - 1] if self.tails else None

    def for_gallery(self, size: int, fingers: int = 10) -> Self:
        """The thresholds that hold ``hit_fpir`` and ``review_fpir`` in a search of ``size``
        subjects comparing ``fingers`` fingers with each; unchanged without tails (fixed
        thresholds from a configuration).

        Why per finger count: a fused score is a sum of per-finger log-likelihood ratios, so an
        impostor compared on one finger sits far nearer any threshold than one compared on ten
        (whose ten negative terms add up); one threshold for both would let a lone finger hit.
        """
        if not self.tails:
            return self
        fingers = min(10, max(1, fingers))
        hit = self._envelope(self.hit_fpir, size, fingers)
        review = min(self._envelope(self.review_fpir, size, fingers), hit)
        return self.model_copy(
            update={"hit": hit, "review": review, "gallery_size": size, "fingers": fingers}
        )

    def _envelope(self, fpir: float, size: int, fingers: int) -> float:
        """The threshold holding ``fpir`` at ``size`` for ``fingers`` fingers compared, and never
        below that of any larger finger count: fewer fingers never need less evidence. Each tail
        is fitted on its own sample, and where two are close their extrapolations can cross; the
        envelope keeps the stated FPIR (each count's own threshold holds it already, a higher one
        holds it with room)."""
        return max(tail.threshold_for(fpir, size) for tail in self.tails[fingers - 1 :])

    def problems(self, sizes: Sequence[int] = CHECKED_GALLERY_SIZES) -> list[str]:
        """What makes these thresholds untrustworthy at the gallery ``sizes`` and every finger
        count from 1 to 10 (empty: none): fewer fingers needing a lower threshold than more, a
        larger gallery needing a lower one than a smaller, a review threshold above the hit
        threshold. Thresholds without tails are fixed and have nothing to check."""
        if not self.tails:
            return []
        found: list[str] = []
        previous: tuple[int, list[float]] | None = None
        for size in sizes:
            row = [self.for_gallery(size, f) for f in range(1, 11)]
            hits = [t.hit for t in row]
            for f in range(1, 10):
                if hits[f - 1] < hits[f] - 1e-9:
                    found.append(
                        f"at {size} subjects, {f} fingers need hit {hits[f - 1]:.3f}, "
                        f"less than {f + 1} fingers' {hits[f]:.3f}"
                    )
            found += [
                f"at {size} subjects and {f} fingers the review threshold is above the hit threshold"
                for f, t in enumerate(row, start=1)
                if t.review > t.hit
            ]
            if previous is not None:
                smaller, before = previous
                found += [
                    f"{f} fingers need a lower hit threshold at {size} subjects than at {smaller}"
                    for f in range(1, 11)
                    if hits[f - 1] < before[f - 1] - 1e-9
                ]
            previous = (size, hits)
        return found

    def for_fpir(self, target: float) -> Self | None:
        """The thresholds with the hit threshold moved to reach ``target`` FPIR, or None without a curve.

        With a tail model the hit threshold is the tail's for ``target`` at the thresholds'
        gallery size. Otherwise it picks the lowest calibrated threshold whose FPIR is at or below
        the target. The review threshold stays unless it would lie above the hit threshold.
        """
        tail = self.tail(self.fingers or 10)
        if tail is not None:
            hit = tail.threshold_for(target, self.gallery_size or 1)
        else:
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


def calibration_digest(thresholds: Thresholds) -> str:
    """What a node judges by, as ``sha256:`` and 16 hex digits: its calibration as configured
    (thresholds, FPIRs, tails and the evidence model they were fitted on; not the per-search values
    derived from them). Nodes with the same digest band the same scores alike; a caller pins it to
    refuse any other (:mod:`federation.trust`)."""
    configured = thresholds.model_dump(mode="json", exclude={"gallery_size", "fingers"})
    return "sha256:" + hashlib.sha256(json.dumps(configured, sort_keys=True).encode()).hexdigest()[:16]


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
