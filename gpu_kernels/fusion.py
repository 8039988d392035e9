"""Ten-print cylinders and the fusion of per-finger MCC scores into one score per subject pair.

Two fusions: the evidence fusion of :mod:`gpu_kernels.evidence` (the default: a sum of per-finger
log-likelihood ratios), and the shrunk mean of :func:`fuse_scores`, kept so both can be compared
on the same scores (``fedprint eval --fusion``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpu_kernels.cylinders import CylinderSet, encode_fingers
from gpu_kernels.evidence import EvidenceModel, finger_evidence, fuse_evidence, shipped_model
from gpu_kernels.params import FusionParams, MccParams
from gpu_kernels.positions import map_positions
from gpu_kernels.similarity import score_fingers
from minutiae.template import TenPrintTemplates

FINGER_POSITIONS = tuple(range(1, 11))
"""ANSI/NIST FGP codes 1-10; position ``f`` lives at index ``f - 1`` of every ``[..., 10]`` axis."""

Fusion = FusionParams | EvidenceModel
"""How per-finger scores become one: the evidence model (LLR sum) or the shrunk mean."""


@dataclass(frozen=True)
class TenPrintCylinders:
    """Cylinders of S subjects, conceptually ``[S, 10, M, ·]``.

    - ``fingers``: 10 :class:`CylinderSet` of S rows each, one per FGP position 1-10 (each padded
      to its own M; an absent finger is an all-invalid row).
    - ``present``: ``bool [S, 10]``, the finger was captured and yields at least one valid
      cylinder. A finger with no valid cylinder scores 0 against anyone, which says nothing
      about identity, so fusion treats it as missing rather than as a failed comparison.
    """

    fingers: tuple[CylinderSet, ...]
    present: Tensor

    def __post_init__(self) -> None:
        if len(self.fingers) != 10:
            raise ValueError(f"need 10 finger positions, got {len(self.fingers)}")

    def __len__(self) -> int:
        return int(self.present.shape[0])

    @property
    def params(self) -> MccParams:
        return self.fingers[0].params

    @property
    def device(self) -> torch.device:
        return self.present.device

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors."""
        return sum(f.nbytes for f in self.fingers) + self.present.numel() * self.present.element_size()

    def valid_counts(self) -> Tensor:
        """``int64 [S, 10]`` valid cylinders per subject and position (what the fusion weighs)."""
        return torch.stack([f.valid.sum(-1) for f in self.fingers], dim=1)

    def to(self, device: torch.device | str) -> TenPrintCylinders:
        """The same subjects on ``device``."""
        return TenPrintCylinders(tuple(f.to(device) for f in self.fingers), self.present.to(device))

    def select(self, index: Tensor | slice) -> TenPrintCylinders:
        """Subjects picked by ``index`` (``int64 [K]``, ``bool [S]`` or a slice)."""
        if isinstance(index, Tensor):
            index = index.to(self.device)
        return TenPrintCylinders(tuple(f.select(index) for f in self.fingers), self.present[index])

    @staticmethod
    def cat(sets: Sequence[TenPrintCylinders]) -> TenPrintCylinders:
        """Concatenates subject sets (same params and device), padding each position's M."""
        if not sets:
            raise ValueError("cannot concatenate an empty sequence of ten-print sets")
        fingers = tuple(CylinderSet.cat([s.fingers[f] for s in sets]) for f in range(10))
        return TenPrintCylinders(fingers, torch.cat([s.present for s in sets]))


def encode_tenprints(
    tenprints: Sequence[TenPrintTemplates], params: MccParams, device: torch.device | str = "cpu"
) -> TenPrintCylinders:
    """Encodes S ten-prints (any fingers may be missing) into :class:`TenPrintCylinders`."""
    fingers = tuple(
        encode_fingers([tp.fingers.get(position) for tp in tenprints], params, device)
        for position in FINGER_POSITIONS
    )
    present = torch.stack([f.valid.any(-1) for f in fingers], dim=1)
    return TenPrintCylinders(fingers, present)


@dataclass(frozen=True)
class TenPrintScores:
    """Scores of P probe subjects against G candidate subjects each.

    - ``per_finger``: ``float32 [P, G, 10]`` MCC score per finger position, 0 where not both present.
    - ``both_present``: ``bool [P, G, 10]``, the position is present on both sides.
    - ``fused``: ``float32 [P, G]``, see :func:`fuse`.
    - ``probe_counts``: ``int64 [P, 10]`` valid cylinders of each probe finger.
    - ``candidate_counts``: ``int64 [P, G, 10]`` valid cylinders of each candidate finger (may be
      an expanded view).
    - ``finger_llr``: ``float32 [P, G, 10]``, each finger's log-likelihood ratio, the terms
      ``fused`` sums (evidence fusion; None with the shrunk mean, which has no such terms).
    """

    per_finger: Tensor
    both_present: Tensor
    fused: Tensor
    probe_counts: Tensor
    candidate_counts: Tensor
    finger_llr: Tensor | None = None

    def refused(self, fusion: Fusion | None) -> TenPrintScores:
        """The same per-finger scores fused by ``fusion`` (None: the shipped evidence model)."""
        return tenprint_scores(
            self.per_finger, self.both_present, self.probe_counts, self.candidate_counts, fusion
        )


def tenprint_scores(
    per_finger: Tensor,
    both_present: Tensor,
    probe_counts: Tensor,
    candidate_counts: Tensor,
    fusion: Fusion | None = None,
) -> TenPrintScores:
    """:class:`TenPrintScores` of raw ``per_finger: [P, G, 10]`` scores (zeroed where not
    ``both_present``), fused by ``fusion``; ``candidate_counts`` may be ``[G, 10]``."""
    per_finger = torch.where(both_present, per_finger, 0.0)
    # Fused from the counts as given: a gallery's [G, 10] is looked up once, not once per probe.
    llr: Tensor | None = None
    if isinstance(fusion, FusionParams):
        fused = fuse_scores(per_finger, both_present, fusion)
    else:
        llr = finger_evidence(
            per_finger, both_present, probe_counts, candidate_counts, fusion or shipped_model()
        )
        fused = llr.sum(-1)
    if candidate_counts.dim() == 2:
        candidate_counts = candidate_counts.unsqueeze(0).expand(per_finger.shape)
    return TenPrintScores(per_finger, both_present, fused, probe_counts, candidate_counts, llr)


def fuse(
    per_finger: Tensor,
    both_present: Tensor,
    probe_counts: Tensor,
    candidate_counts: Tensor,
    fusion: Fusion | None = None,
) -> Tensor:
    """``[P, G]`` fused scores by ``fusion``: the evidence model (default: the shipped one) or
    the shrunk mean of :class:`FusionParams`."""
    if isinstance(fusion, FusionParams):
        return fuse_scores(per_finger, both_present, fusion)
    return fuse_evidence(per_finger, both_present, probe_counts, candidate_counts, fusion or shipped_model())


def fuse_scores(per_finger: Tensor, both_present: Tensor, fusion: FusionParams | None = None) -> Tensor:
    """Fuses ``per_finger: [..., 10]`` scores over the positions where ``both_present`` -> ``[...]``.

    ``fused = (Σ_common s_f + strength · prior) / (n_common + strength)``, and 0 with no common
    finger. This is the mean score over the fingers both sides have, shrunk towards a low prior
    as if ``strength`` extra impostor-like fingers had been compared. Why: a plain mean treats a
    lucky single-finger score like the same mean over ten fingers, although one finger is far
    weaker evidence (the spread of a mean of n impostor scores falls like 1/√n); a plain sum
    punishes subjects with genuinely missing fingers (amputations, bandages, partial bookings)
    linearly. With the defaults one perfect finger fuses to ≈ 0.37 and ten perfect fingers to
    ≈ 0.84, and fused scores stay in [0, 1] because every term does.
    """
    fusion = fusion or FusionParams()
    n = both_present.sum(-1).to(per_finger.dtype)
    total = torch.where(both_present, per_finger, 0.0).sum(-1)
    fused = (total + fusion.strength * fusion.prior) / (n + fusion.strength).clamp(min=1e-12)
    return torch.where(n > 0, fused, 0.0)


def score_tenprints(
    probes: TenPrintCylinders,
    gallery: TenPrintCylinders,
    params: MccParams,
    *,
    fusion: Fusion | None = None,
    chunk_bytes: int | None = None,
) -> TenPrintScores:
    """Scores every probe subject against every gallery subject, finger by finger, and fuses.

    ``probes: [P, 10, ·]``, ``gallery: [G, 10, ·]`` -> :class:`TenPrintScores` with
    ``[P, G, 10]`` per-finger scores and ``[P, G]`` fused scores. Only same-position fingers
    are compared (the 10 positions are the only Python loop; on a CPU they run side by side,
    see :mod:`gpu_kernels.positions`). ``fusion`` defaults to
    the shipped evidence model.
    """
    both = probes.present[:, None, :] & gallery.present[None, :, :]  # [P, G, 10]
    per_finger = torch.stack(
        map_positions(
            lambda f: score_fingers(probes.fingers[f], gallery.fingers[f], params, chunk_bytes=chunk_bytes),
            probes.device,
        ),
        dim=-1,
    )
    return tenprint_scores(per_finger, both, probes.valid_counts(), gallery.valid_counts(), fusion)
