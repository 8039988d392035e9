"""Ten-print cylinders and the fusion of per-finger MCC scores into one score per subject pair."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpu_kernels.cylinders import CylinderSet, encode_fingers
from gpu_kernels.params import FusionParams, MccParams
from gpu_kernels.similarity import score_fingers
from minutiae.template import TenPrintTemplates

FINGER_POSITIONS = tuple(range(1, 11))
"""ANSI/NIST FGP codes 1-10; position ``f`` lives at index ``f - 1`` of every ``[..., 10]`` axis."""


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
    """Scores of P probe subjects against G gallery subjects.

    - ``per_finger``: ``float32 [P, G, 10]`` LSS per finger position, 0 where not both present.
    - ``both_present``: ``bool [P, G, 10]``, the position is present on both sides.
    - ``fused``: ``float32 [P, G]`` in [0, 1], see :func:`fuse_scores`.
    """

    per_finger: Tensor
    both_present: Tensor
    fused: Tensor


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
    fusion: FusionParams | None = None,
    chunk_bytes: int | None = None,
) -> TenPrintScores:
    """Scores every probe subject against every gallery subject, finger by finger, and fuses.

    ``probes: [P, 10, ·]``, ``gallery: [G, 10, ·]`` -> :class:`TenPrintScores` with
    ``[P, G, 10]`` per-finger scores and ``[P, G]`` fused scores. Only same-position fingers
    are compared (the loop over 10 positions is the only Python loop). ``fusion`` defaults to
    ``FusionParams()``.
    """
    both = probes.present[:, None, :] & gallery.present[None, :, :]  # [P, G, 10]
    per_finger = torch.stack(
        [
            score_fingers(probes.fingers[f], gallery.fingers[f], params, chunk_bytes=chunk_bytes)
            for f in range(10)
        ],
        dim=-1,
    )
    per_finger = torch.where(both, per_finger, 0.0)
    return TenPrintScores(per_finger, both, fuse_scores(per_finger, both, fusion))
