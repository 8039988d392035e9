"""The shortlist tier: a compact code per subject, searched with faiss, that votes candidates
which full MCC then scores.

Why this representation. MCC cylinders are expressed in each minutia's own frame, so the
*average* cylinder of a finger (the mean over its valid cylinders of the cell values) is a
soft histogram of the finger's local minutia arrangements that does not move when the finger
is rotated or translated, and changes only gradually with distortion, lost minutiae and partial
area. Pooling the 16x16 spatial cells into 4x4 blocks keeps the coarse layout (96 numbers per
finger with Nd = 6) while averaging away position noise. Centred on the gallery mean and
L2-normalised per finger, the inner product of two subjects' codes is the sum of per-finger
cosine similarities over the fingers both have, the same evidence ten-print fusion adds up.

Storage: 10 fingers x 96 dims in float16 would be 1920 bytes; the faiss index stores them as
8-bit scalar-quantised values (``QT_8bit`` trained on the gallery), 960 bytes per subject, the
issue's "at most 1 KB per subject". Binarised cylinders were the alternative: a cylinder is 192
bytes, so even 1 bit per cell of every cylinder is ~90 KB per subject, and a per-cylinder vote
needs hundreds of queries per probe; the pooled code needs one query per probe.

faiss on GPU has no binary IVF and does not clone every index type (see DEPENDENCIES.md); a flat
scalar-quantised index is cloned by ``index_cpu_to_gpu`` when faiss-gpu is installed, and on
the CPU build the index simply stays on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor

from gpu_kernels.cylinders import CylinderSet
from gpu_kernels.fusion import TenPrintCylinders, TenPrintScores, fuse_scores
from gpu_kernels.params import MccParams
from gpu_kernels.similarity import score_fingers_paired

#: Spatial pooling of the 16x16 cells into (16/POOL)^2 blocks.
POOL = 4
_MIB = 1 << 20


def finger_descriptors(cyl: CylinderSet, *, pool: int = POOL, chunk_bytes: int = 64 * _MIB) -> Tensor:
    """The mean pooled cylinder of each finger: ``[N, M, ·]`` -> ``float32 [N, (Ns/pool)²·Nd]``.

    Only valid cylinders count; a finger without one gets zeros. Chunked so the unpacked
    ``[n, M, C]`` values stay near ``chunk_bytes``.
    """
    p = cyl.params
    if p.ns % pool:
        raise ValueError(f"pool={pool} does not divide ns={p.ns}")
    blocks = p.ns // pool
    n, m = cyl.valid.shape
    out = torch.zeros((n, blocks * blocks * p.nd), dtype=torch.float32, device=cyl.device)
    step = max(1, chunk_bytes // max(1, m * p.cells * 4))
    for lo in range(0, n, step):
        part = cyl.select(slice(lo, lo + step))
        k = len(part)
        values = part.unpacked_values().reshape(k, m, blocks, pool, blocks, pool, p.nd)
        pooled = values.mean(dim=(3, 5)).reshape(k, m, -1)  # [k, M, D]
        weight = part.valid.to(torch.float32)
        total = torch.einsum("kmd,km->kd", pooled, weight)
        out[lo : lo + k] = total / weight.sum(-1, keepdim=True).clamp(min=1.0)
    return out


def subject_descriptors(cylinders: TenPrintCylinders, *, pool: int = POOL) -> Tensor:
    """Finger descriptors of S subjects, ``float32 [S, 10, D]``; absent fingers are all zero."""
    parts = [finger_descriptors(f, pool=pool) for f in cylinders.fingers]
    desc = torch.stack(parts, dim=1)
    return torch.where(cylinders.present[..., None], desc, 0.0)


def subject_codes(descriptors: Tensor, present: Tensor, centre: Tensor) -> Tensor:
    """Search codes ``float32 [S, 10·D]`` from ``descriptors: [S, 10, D]``, ``present: bool [S, 10]``
    and the per-position ``centre: [10, D]``: centred, unit length per finger, zero where absent."""
    centred = descriptors - centre[None]
    unit = centred / torch.linalg.vector_norm(centred, dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.where(present[..., None], unit, 0.0).reshape(descriptors.shape[0], -1)


@dataclass
class ShortlistIndex:
    """faiss inner-product index over subject codes, rows in gallery order.

    ``centre: [10, D]`` is the gallery's mean descriptor per position, fixed when the index is built.
    """

    index: faiss.Index
    centre: Tensor
    size: int

    @staticmethod
    def build(descriptors: Tensor, present: Tensor, *, quantize: bool = True) -> ShortlistIndex:
        """Index of S subjects from ``descriptors: [S, 10, D]`` and ``present: bool [S, 10]``."""
        desc = descriptors.float().cpu()
        pres = present.cpu()
        weight = pres[..., None].float()
        centre = (desc * weight).sum(0) / weight.sum(0).clamp(min=1.0)  # [10, D]
        codes = subject_codes(desc, pres, centre).numpy().astype(np.float32)
        d = codes.shape[1]
        index: faiss.Index
        if quantize:
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index.train(codes)
        else:
            index = faiss.IndexFlatIP(d)
        index.add(codes)
        return ShortlistIndex(index, centre, len(codes))

    @property
    def bytes_per_subject(self) -> int:
        """Bytes the index stores per subject (its code size)."""
        return int(getattr(self.index, "code_size", self.index.d * 4))

    def search(self, descriptors: Tensor, present: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best rows per probe: ``descriptors: [P, 10, D]``, ``present: [P, 10]`` ->
        (``float32 [P, k]`` code similarities, ``int64 [P, k]`` gallery rows), best first."""
        k = min(k, self.size)
        codes = subject_codes(descriptors.float().cpu(), present.cpu(), self.centre)
        scores, rows = self.index.search(np.ascontiguousarray(codes.numpy(), dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(rows).to(torch.int64)

    def candidates(self, probes: TenPrintCylinders, k: int) -> Tensor:
        """The ``k`` gallery rows the index votes for each probe ten-print, ``int64 [P, k]``, best first."""
        return self.search(subject_descriptors(probes), probes.present, k)[1]


def score_shortlisted(
    probes: TenPrintCylinders, gallery: TenPrintCylinders, rows: Tensor, params: MccParams
) -> TenPrintScores:
    """Full MCC of each probe against its own shortlist: ``probes: [P, 10, ·]``, gallery rows
    ``rows: int64 [P, K]`` (of ``gallery``, which may live in host memory: only the P·K
    shortlisted subjects' fingers are copied to the probes' device, a chunk at a time) -> scores
    ``[P, K]``, column j of probe p being gallery row ``rows[p, j]``.

    One batched pass per finger position for the whole micro-batch
    (:func:`gpu_kernels.similarity.score_fingers_paired`): P·K pairs, not the P·(union of the
    shortlists) that one :func:`~gpu_kernels.fusion.score_tenprints` call would score (probes in
    one batch rarely share candidates), and no loop over probes. The ten positions fuse as in
    :func:`~gpu_kernels.fusion.score_tenprints`, through :func:`gpu_kernels.fusion.fuse_scores`.
    """
    rows = rows.to(gallery.device)
    per_finger = torch.stack(
        [score_fingers_paired(probes.fingers[f], gallery.fingers[f], rows, params) for f in range(10)],
        dim=-1,
    )  # [P, K, 10]
    both = probes.present[:, None, :] & gallery.present[rows].to(probes.device)  # [P, K, 10]
    per_finger = torch.where(both, per_finger, 0.0)
    return TenPrintScores(per_finger, both, fuse_scores(per_finger, both))
