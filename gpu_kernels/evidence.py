"""Ten-print fusion as evidence: per-finger scores made comparable, then summed as log-likelihood ratios.

A raw MCC score means different things for different fingers. LSS averages the n_P best local
similarities of all n_A x n_B cylinder pairs, so two fingers with few minutiae (a small plain
impression) reach high averages by chance: on the hard synthetic preset a 9-minutia finger scored
an unrelated subject's finger above most mated fingers. Three steps turn raw scores into evidence:

1. **Count normalisation.** Each score becomes ``z = (s - location) / scale``, where location and
   scale describe impostor comparisons of fingers with those valid-cylinder counts (a table over
   count bins of the probe and the candidate finger, fitted on synthetic impostor pairs by
   ``fedprint eval --fit-fusion``): the impostor median maps to 0 and the 99th percentile to
   ``TAIL_Z[0]``. Above that, a second scale (``upper``) maps the 99.9th percentile to
   ``TAIL_Z[1]``, because few cylinders make a heavier tail, not only a wider one. So the same
   ``z`` is about equally rare whatever the counts, out to where the calibration works.
2. **Search-time normalisation.** In a 1:N search the probe finger has just been compared with
   many candidates, nearly all impostors. When there are at least ``min_cohort`` of them, and
   their median ``z`` lies more than ``cohort_margin`` above 0, the excess is subtracted: a probe
   finger that scores high against everyone gains nothing from it. Only ever lowered, and only
   for such probes (the median of a probe finger against 20 impostors lies below the margin in
   996 of 1,000 cases on the training data), so ordinary searches score the same whichever shard or tier
   scores them, and a search of a handful of subjects (too few for a median) is left alone.
3. **Fusion.** Each finger compared on both sides contributes ``LLR_position(z)``, a
   non-decreasing piecewise-linear log-likelihood ratio fitted on genuine and impostor ``z``
   (plain and rolled probes); the fused score is their sum. A finger missing on either side
   contributes nothing, so one finger carries only its own evidence, and a fused score is a
   log-likelihood ratio of identity for the subject pair (natural log).

Everything is elementwise over ``[P, G, 10]`` tensors (plus one median over G), on any device.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: The model fitted on synthetic data and shipped with the package (`fedprint eval --fit-fusion`).
SHIPPED_MODEL = Path(__file__).with_name("evidence_model.json")

#: z at the impostor 99th and 99.9th percentiles (standard normal quantiles).
TAIL_Z = (2.3263478740408408, 3.090232306167813)

#: Fewest other candidates behind a search-time median, unless a model says otherwise.
DEFAULT_MIN_COHORT = 20

#: Slope (LLR per unit z) beyond the outermost knots and the least rise between knots, so the
#: fused score rises whenever a finger's score does, also where the data is too thin to say by how much.
MIN_SLOPE = 1e-3


@dataclass(frozen=True)
class EvidenceModel:
    """Count normalisation and per-position LLR curves; see the module docstring.

    - ``count_edges``: ascending lower edges of the valid-cylinder count bins (first one 0).
    - ``location``, ``scale``, ``upper``: ``[bins][bins]`` impostor location, scale up to the
      99th percentile and scale above it, indexed by the probe finger's bin, then the candidate's.
    - ``knots``: ascending ``z`` values where the LLR curves are given.
    - ``llr``: ``[10][knots]`` LLR (natural log) per finger position 1-10 at each knot, strictly
      increasing along the knots.
    - ``min_cohort``: fewest other candidates behind a search-time median.
    - ``cohort_margin``: how far above 0 (in ``z``) that median may lie before it is subtracted.
    """

    count_edges: tuple[int, ...]
    location: tuple[tuple[float, ...], ...]
    scale: tuple[tuple[float, ...], ...]
    upper: tuple[tuple[float, ...], ...]
    knots: tuple[float, ...]
    llr: tuple[tuple[float, ...], ...]
    min_cohort: int = DEFAULT_MIN_COHORT
    cohort_margin: float = 1.0
    source: str = ""
    _tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        bins = len(self.count_edges)
        if bins < 1 or self.count_edges[0] != 0 or list(self.count_edges) != sorted(set(self.count_edges)):
            raise ValueError("count_edges must start at 0 and increase")
        if len(self.location) != bins or any(len(row) != bins for row in self.location):
            raise ValueError(f"location must be {bins} x {bins}")
        for name, table in (("scale", self.scale), ("upper", self.upper)):
            if len(table) != bins or any(len(row) != bins for row in table):
                raise ValueError(f"{name} must be {bins} x {bins}")
            if any(s <= 0 for row in table for s in row):
                raise ValueError(f"every {name} must be positive")
        if len(self.knots) < 2 or any(b <= a for a, b in itertools.pairwise(self.knots)):
            raise ValueError("need at least two strictly increasing knots")
        if len(self.llr) != 10 or any(len(curve) != len(self.knots) for curve in self.llr):
            raise ValueError(f"llr must be 10 curves of {len(self.knots)} values")
        for curve in self.llr:
            if any(b <= a for a, b in itertools.pairwise(curve)):
                raise ValueError("every LLR curve must increase strictly")
        if self.min_cohort < 2 or not self.cohort_margin >= 0.0:
            raise ValueError("min_cohort must be at least 2 and cohort_margin at least 0")

    def tensors(self, device: torch.device) -> dict[str, Tensor]:
        """The tables as tensors on ``device`` (cached per device)."""
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = {
                "edges": torch.tensor(self.count_edges[1:], dtype=torch.int64, device=device),
                "location": torch.tensor(self.location, dtype=torch.float32, device=device),
                "scale": torch.tensor(self.scale, dtype=torch.float32, device=device),
                "upper": torch.tensor(self.upper, dtype=torch.float32, device=device),
                "knots": torch.tensor(self.knots, dtype=torch.float32, device=device),
                "llr": torch.tensor(self.llr, dtype=torch.float32, device=device),
            }
        return self._tensors[key]

    def to_json(self) -> dict[str, Any]:
        """The model as JSON-ready values."""
        return {
            "count_edges": list(self.count_edges),
            "location": [list(r) for r in self.location],
            "scale": [list(r) for r in self.scale],
            "upper": [list(r) for r in self.upper],
            "knots": list(self.knots),
            "llr": [list(c) for c in self.llr],
            "min_cohort": self.min_cohort,
            "cohort_margin": self.cohort_margin,
            "source": self.source,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> EvidenceModel:
        """The model from :meth:`to_json`'s values."""
        return EvidenceModel(
            count_edges=tuple(int(e) for e in data["count_edges"]),
            location=tuple(tuple(float(v) for v in r) for r in data["location"]),
            scale=tuple(tuple(float(v) for v in r) for r in data["scale"]),
            upper=tuple(tuple(float(v) for v in r) for r in data["upper"]),
            knots=tuple(float(k) for k in data["knots"]),
            llr=tuple(tuple(float(v) for v in c) for c in data["llr"]),
            min_cohort=int(data.get("min_cohort", DEFAULT_MIN_COHORT)),
            cohort_margin=float(data.get("cohort_margin", 1.0)),
            source=str(data.get("source", "")),
        )

    def save(self, path: Path) -> None:
        """Writes the model as JSON."""
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @staticmethod
    def load(path: Path = SHIPPED_MODEL) -> EvidenceModel:
        """Reads a model written by :meth:`save` (by default the shipped one)."""
        return EvidenceModel.from_json(json.loads(path.read_text(encoding="utf-8")))


_shipped: EvidenceModel | None = None


def shipped_model() -> EvidenceModel:
    """The shipped model, read once."""
    global _shipped
    if _shipped is None:
        _shipped = EvidenceModel.load()
    return _shipped


def model_digest(path: Path = SHIPPED_MODEL) -> str:
    """The digest of an evidence model file, which a calibration names (``Thresholds.evidence_model``):
    thresholds fitted on one model's scores mean nothing for another's."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def normalised_scores(
    per_finger: Tensor, probe_counts: Tensor, candidate_counts: Tensor, model: EvidenceModel
) -> Tensor:
    """Count-normalised ``z`` of raw scores ``[..., 10]``, given valid-cylinder counts that
    broadcast against them (``probe_counts: [P, 1, 10]``, ``candidate_counts: [P, G, 10]``)."""
    t = model.tensors(per_finger.device)
    bins = t["location"].shape[0]
    pb = torch.bucketize(probe_counts, t["edges"], right=True)
    # contiguous(): free for the counts a search passes, a copy for an expanded view.
    cb = torch.bucketize(candidate_counts.contiguous(), t["edges"], right=True)
    cell = (pb * bins + cb).expand(per_finger.shape)
    location = t["location"].reshape(-1)[cell]
    scale = t["scale"].reshape(-1)[cell]
    z = (per_finger - location) / scale
    upper = t["upper"].reshape(-1)[cell]
    knee = location + TAIL_Z[0] * scale
    return torch.where(per_finger > knee, TAIL_Z[0] + (per_finger - knee) / upper, z)


def cohort_shift(z: Tensor, compared: Tensor, min_cohort: int, margin: float = 0.0) -> Tensor:
    """Per probe finger, how far its ``z`` against all candidates sits above ``margin``:
    ``[P, G, 10]`` -> ``[P, 1, 10]``, the median over the candidates compared at that position
    less ``margin``, clamped at 0, and 0 where fewer than ``min_cohort`` candidates were compared."""
    masked = torch.where(compared, z, torch.nan)
    median = torch.nanmedian(masked, dim=1, keepdim=True).values if z.shape[1] else z[:, :1]
    enough = compared.sum(1, keepdim=True) >= min_cohort
    return torch.where(enough & ~torch.isnan(median), (median - margin).clamp(min=0.0), 0.0)


def finger_llr(z: Tensor, model: EvidenceModel) -> Tensor:
    """``LLR_position(z)`` for ``z: [..., 10]`` (position ``f`` at index ``f - 1``), linear between
    knots and continued beyond them with slope :data:`MIN_SLOPE`."""
    t = model.tensors(z.device)
    knots, llr = t["knots"], t["llr"]  # [K], [10, K]
    k = knots.shape[0]
    flat = z.reshape(-1, 10).transpose(0, 1).contiguous()  # [10, N]
    right = torch.searchsorted(knots, flat).clamp(1, k - 1)
    left = right - 1
    x0, x1 = knots[left], knots[right]
    y0, y1 = torch.gather(llr, 1, left), torch.gather(llr, 1, right)
    inside = y0 + (y1 - y0) * (flat - x0) / (x1 - x0)
    below = llr[:, :1] + MIN_SLOPE * (flat - knots[0])
    above = llr[:, -1:] + MIN_SLOPE * (flat - knots[-1])
    out = torch.where(flat < knots[0], below, torch.where(flat > knots[-1], above, inside))
    return out.transpose(0, 1).reshape(z.shape)


def llr_at(z: Tensor, position: Tensor, model: EvidenceModel) -> Tensor:
    """``LLR_position(z)`` of single comparisons: ``z: [N]`` at FGP ``position: [N]`` (1-10)."""
    one_hot = torch.zeros((z.shape[0], 10), dtype=z.dtype, device=z.device)
    one_hot.scatter_(1, (position - 1).unsqueeze(1), z.unsqueeze(1))
    return torch.gather(finger_llr(one_hot, model), 1, (position - 1).unsqueeze(1)).squeeze(1)


def finger_evidence(
    per_finger: Tensor,
    both_present: Tensor,
    probe_counts: Tensor,
    candidate_counts: Tensor,
    model: EvidenceModel,
    *,
    cohort: bool = True,
) -> Tensor:
    """Each finger's log-likelihood ratio ``[P, G, 10]`` from raw ``per_finger: [P, G, 10]``
    scores, 0 where a position is not on both sides: the terms the fused score sums.

    ``both_present: bool [P, G, 10]``; ``probe_counts: [P, 10]`` and ``candidate_counts:
    [P, G, 10]`` (or ``[G, 10]``) valid cylinders per finger. ``cohort`` applies the search-time
    normalisation over the G candidates (step 2 of the module docstring).
    """
    if candidate_counts.dim() == 2:
        candidate_counts = candidate_counts.unsqueeze(0)
    z = normalised_scores(per_finger, probe_counts.unsqueeze(1), candidate_counts, model)
    if cohort:
        z = z - cohort_shift(z, both_present, model.min_cohort, model.cohort_margin)
    return torch.where(both_present, finger_llr(z, model), 0.0)


def fuse_evidence(
    per_finger: Tensor,
    both_present: Tensor,
    probe_counts: Tensor,
    candidate_counts: Tensor,
    model: EvidenceModel,
    *,
    cohort: bool = True,
) -> Tensor:
    """Fused log-likelihood ratios ``[P, G]``: the sum of :func:`finger_evidence`."""
    return finger_evidence(
        per_finger, both_present, probe_counts, candidate_counts, model, cohort=cohort
    ).sum(-1)
