"""The shortlist tier: a compact code per subject, searched with faiss, that votes candidates
which full MCC then scores.

Why this representation. MCC cylinders are expressed in each minutia's own frame, so the
*average* cylinder of a finger is a soft histogram of the finger's local minutia arrangements
that does not move when the finger is rotated or translated, and changes only gradually with
distortion, lost minutiae and partial area. Three choices make it survive a plain (flat) probe
against a rolled enrolment, measured on the ``hard`` preset (docs/accuracy.md, "Shortlist"):

- **8x8 spatial blocks** (``POOL = 2``): 384 numbers per finger with Nd = 6. The earlier 4x4
  blocks averaged away too much of the layout.
- **Shares over valid cells**: each (block, direction) number is the set cells of that block
  over the valid cylinders divided by the *valid* cells there, not by the cylinders. A plain
  print's border cylinders have cells outside its contact area; dividing by cylinders counted
  those as empty, so a smaller print looked like a different finger.
- **Shrunk PCA whitening per finger position**, learned from the gallery when the index is
  built: project the centred descriptor on the top ``CODE_DIMS`` principal axes, each scaled by
  ``1/sqrt(eigenvalue + WHITENING_SHRINK x mean eigenvalue)``, then L2-normalise. Whitening
  stops the few high-variance axes (shared by every finger of a pattern class) from dominating
  the cosine; the shrinkage keeps the low-variance, noise-dominated axes from being blown up.

The inner product of two subjects' codes is then the sum of per-finger cosine similarities over
the fingers both have, the same evidence ten-print fusion adds up, and an absent finger (a
partial ten-print) simply adds nothing.

Storage: 10 fingers x ``CODE_DIMS`` (192) dims stored as 8-bit scalar-quantised values
(``QT_8bit`` trained on the gallery) is 1920 bytes per subject in the index; the host keeps the
384-dim float descriptors to rebuild the index as the gallery changes. ``build(dims=96)`` gives
960 bytes at a small recall cost. Binarised cylinders were the alternative: a cylinder is 192
bytes, so even 1 bit per cell of every cylinder is ~90 KB per subject, and a per-cylinder vote
needs hundreds of queries per probe; the pooled code needs one query per probe.

faiss on GPU has no binary IVF and does not clone every index type (see DEPENDENCIES.md); a flat
scalar-quantised index is cloned by ``index_cpu_to_gpu`` when the index is built for a CUDA
device and faiss-gpu is installed (:func:`faiss_gpu_available`); with the CPU build of faiss
the index stays on the host, where one query of a 100,000-subject index takes about 10 ms.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor

from gpu_kernels.cylinders import CylinderSet
from gpu_kernels.fusion import Fusion, TenPrintCylinders, TenPrintScores, tenprint_scores
from gpu_kernels.params import MccParams
from gpu_kernels.positions import map_positions
from gpu_kernels.products import bit_operand_dtype
from gpu_kernels.similarity import score_fingers, score_fingers_paired

#: Spatial pooling of the 16x16 cells into (16/POOL)^2 blocks.
POOL = 2
#: Dimensions per finger kept by the whitening projection (bytes per finger in the index).
CODE_DIMS = 192
#: Eigenvalue floor of the whitening, in units of the mean kept eigenvalue. Measured on the hard
#: preset (2,000 subjects, plain probes): 0.3 -> 96.5 %, 3 -> 98.6 %, 10 -> 99.2 % and 30 ->
#: 99.1 % of mates kept at K = 50; without whitening (all 384 numbers, 4-bit) 97.3 %.
WHITENING_SHRINK = 10.0
#: At most this many fingers per position estimate the whitening (an evenly strided sample).
STATS_ROWS = 20_000
#: Gallery descriptors also pool each finger's central cylinders: those whose minutia lies within
#: this share of the finger's extent (the farthest valid minutia) of its valid minutiae's centre.
#: A plain probe shows about the centre of the rolled print it was enrolled as, so its pooled
#: cylinders resemble the centre's more than the whole's. Measured on 20,000 hard subjects, half
#: the probes plain (2,000 probes, exact inner products; docs/accuracy.md): mates kept at K = 200
#: went from 98.80 % to 99.45 % with 0.7 (0.55: 99.00, 0.6: 99.10, 0.65: 99.30, 0.75: 99.35,
#: 0.85: 99.15 %).
CENTRAL_SHARE = 0.7
#: Fewer central cylinders than this and the central view is the whole finger.
MIN_CENTRAL = 4
#: Changes whenever :func:`subject_descriptors` or :func:`enrolment_descriptors` compute something
#: else, so that descriptors kept on disk (the node's cache, ``fedprint bench shortlist
#: --workdir``) are recomputed. 3: gallery descriptors average the whole and the central view;
#: 2: 8x8 blocks, shares over valid cells (1 was 4x4 blocks, mean over cylinders).
DESCRIPTOR_VERSION = 3
_MIB = 1 << 20


def central_cylinders(cyl: CylinderSet, share: float = CENTRAL_SHARE) -> Tensor:
    """``bool [N, M]``: the valid cylinders whose minutia lies within ``share`` of the finger's
    extent of the centre of its valid minutiae (all valid ones where fewer than
    :data:`MIN_CENTRAL` would be left)."""
    valid = cyl.valid
    weight = valid.to(torch.float32)
    centre = (cyl.xy * weight[..., None]).sum(1) / weight.sum(1).clamp(min=1.0)[:, None]
    distance = torch.linalg.vector_norm(cyl.xy - centre[:, None], dim=-1)
    extent = torch.where(valid, distance, 0.0).amax(1, keepdim=True) if valid.shape[1] else distance
    central = valid & (distance <= share * extent)
    return torch.where((central.sum(1) < MIN_CENTRAL)[:, None], valid, central)


def finger_descriptors(
    cyl: CylinderSet, *, pool: int = POOL, chunk_bytes: int = 64 * _MIB, central: bool = False
) -> Tensor:
    """The pooled cylinder of each finger: ``[N, M, ·]`` -> ``float32 [N, (Ns/pool)²·Nd]``.

    Each number is, for one spatial block and direction section, the cell values summed over
    the finger's valid cylinders divided by the valid cells summed the same way (a share in
    [0, 1] for the binary variant), so cells outside a partial print's area do not count as
    empty. A finger without a valid cylinder gets zeros. With ``central``, the mean of that and
    the same pooling over the :func:`central_cylinders` only (one unpacking for both). Chunked
    so the unpacked ``[n, M, C]`` values stay near ``chunk_bytes``.
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
        views = [part.valid, central_cylinders(part)] if central else [part.valid]
        weight = torch.stack(views, dim=-1).to(torch.float32)  # [k, M, views]
        # Sum over the chosen cylinders first (one batched product per operand), pool after.
        ones = torch.einsum("kmc,kmv->kvc", part.unpacked_values(), weight)
        cells = torch.einsum("kmc,kmv->kvc", part.unpacked_cell_valid(), weight)
        v = len(views)
        ones = ones.reshape(k, v, blocks, pool, blocks, pool, p.nd).sum(dim=(3, 5))  # [k, v, B, B, Nd]
        valid = cells.reshape(k, v, blocks, pool, blocks, pool).sum(dim=(3, 5))  # [k, v, B, B]
        shares = (ones / valid[..., None].clamp(min=1.0)).reshape(k, v, -1)
        out[lo : lo + k] = shares.mean(dim=1)
    return out


def subject_descriptors(cylinders: TenPrintCylinders, *, pool: int = POOL, central: bool = False) -> Tensor:
    """Finger descriptors of S subjects, ``float32 [S, 10, D]``; absent fingers are all zero.
    This is a probe's descriptor; ``central`` gives an enrolled subject's
    (:func:`enrolment_descriptors`)."""
    parts = [finger_descriptors(f, pool=pool, central=central) for f in cylinders.fingers]
    desc = torch.stack(parts, dim=1)
    return torch.where(cylinders.present[..., None], desc, 0.0)


def enrolment_descriptors(cylinders: TenPrintCylinders, *, pool: int = POOL) -> Tensor:
    """Descriptors of enrolled subjects, ``float32 [S, 10, D]``: each finger's mean of the whole
    and the central view (:data:`CENTRAL_SHARE`), so that a plain probe of the centre finds the
    rolled print it came from. The index is built from these; probes use
    :func:`subject_descriptors`."""
    return subject_descriptors(cylinders, pool=pool, central=True)


def whitening(
    descriptors: Tensor,
    present: Tensor,
    centre: Tensor,
    *,
    dims: int = CODE_DIMS,
    shrink: float = WHITENING_SHRINK,
) -> Tensor:
    """Per-position shrunk PCA whitening ``float32 [10, D, d]`` (``d = min(dims, D)``) from the
    gallery's ``descriptors: [S, 10, D]``, ``present: bool [S, 10]`` and ``centre: [10, D]``.

    Column j is the j-th principal axis scaled by ``1/sqrt(λ_j + shrink·mean(λ))``. A position
    with no enrolled finger gets the plain axes (its gallery codes are all zero anyway).
    """
    d_in = descriptors.shape[-1]
    d = min(dims, d_in)
    mats = []
    for f in range(descriptors.shape[1]):
        x = (descriptors[present[:, f], f] - centre[f]).double()
        x = x[:: max(1, len(x) // STATS_ROWS)]
        cov = x.T @ x / max(len(x), 1)
        eigenvalues, axes = torch.linalg.eigh(cov)  # ascending
        top, kept = eigenvalues.flip(0)[:d].clamp(min=0.0), axes.flip(1)[:, :d]
        floor = shrink * float(top.mean())
        scale = (top + floor).rsqrt() if floor > 0 else torch.ones_like(top)
        mats.append((kept * scale).float())
    return torch.stack(mats)


def subject_codes(
    descriptors: Tensor, present: Tensor, centre: Tensor, projection: Tensor | None = None
) -> Tensor:
    """Search codes ``float32 [S, 10·d]`` from ``descriptors: [S, 10, D]``, ``present: bool [S, 10]``,
    the per-position ``centre: [10, D]`` and ``projection: [10, D, d]`` (default: none, d = D):
    centred, projected, unit length per finger, zero where absent."""
    centred = descriptors - centre[None]
    if projection is not None:
        centred = torch.einsum("sfd,fde->sfe", centred, projection)
    unit = centred / torch.linalg.vector_norm(centred, dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.where(present[..., None], unit, 0.0).reshape(descriptors.shape[0], -1)


@dataclass
class ShortlistIndex:
    """faiss inner-product index over subject codes, rows in gallery order.

    ``centre: [10, D]`` is the gallery's mean descriptor per position and ``projection:
    [10, D, d]`` its whitening (:func:`whitening`), both fixed when the index is built.
    """

    index: faiss.Index
    centre: Tensor
    projection: Tensor
    size: int
    #: Where faiss searches: "cpu", or "cuda:N" when the index was cloned to that GPU.
    searched_on: str = "cpu"

    @staticmethod
    def build(
        descriptors: Tensor,
        present: Tensor,
        *,
        quantize: bool = True,
        dims: int = CODE_DIMS,
        shrink: float = WHITENING_SHRINK,
        device: torch.device | str = "cpu",
    ) -> ShortlistIndex:
        """Index of S subjects from ``descriptors: [S, 10, D]`` and ``present: bool [S, 10]``;
        ``dims`` per finger are kept (``10·dims`` bytes per subject when ``quantize``). For a
        CUDA ``device`` the index is cloned to that GPU where faiss-gpu is installed."""
        desc = descriptors.float().cpu()
        pres = present.cpu()
        weight = pres[..., None].float()
        centre = (desc * weight).sum(0) / weight.sum(0).clamp(min=1.0)  # [10, D]
        projection = whitening(desc, pres, centre, dims=dims, shrink=shrink)
        codes = subject_codes(desc, pres, centre, projection).numpy().astype(np.float32)
        d = codes.shape[1]
        index: faiss.Index
        if quantize:
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index.train(codes)
        else:
            index = faiss.IndexFlatIP(d)
        index.add(codes)
        target = torch.device(device)
        if target.type == "cuda" and faiss_gpu_available():
            gpu = target.index if target.index is not None else torch.cuda.current_device()
            cloned = faiss.index_cpu_to_gpu(_gpu_resources(), gpu, index)
            return ShortlistIndex(cloned, centre, projection, len(codes), f"cuda:{gpu}")
        return ShortlistIndex(index, centre, projection, len(codes))

    @property
    def bytes_per_subject(self) -> int:
        """Bytes the index stores per subject (its code size)."""
        return int(getattr(self.index, "code_size", self.index.d * 4))

    def search(self, descriptors: Tensor, present: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best rows per probe: ``descriptors: [P, 10, D]``, ``present: [P, 10]`` ->
        (``float32 [P, k]`` code similarities, ``int64 [P, k]`` gallery rows), best first."""
        k = min(k, self.size)
        codes = subject_codes(descriptors.float().cpu(), present.cpu(), self.centre, self.projection)
        scores, rows = self.index.search(np.ascontiguousarray(codes.numpy(), dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(rows).to(torch.int64)

    def candidates(self, probes: TenPrintCylinders, k: int) -> Tensor:
        """The ``k`` gallery rows the index votes for each probe ten-print, ``int64 [P, k]``, best first."""
        return self.search(subject_descriptors(probes), probes.present, k)[1]


def faiss_gpu_available() -> bool:
    """Whether the installed faiss can search on a GPU (faiss-gpu, with a device it can see)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.cache
def _gpu_resources() -> faiss.StandardGpuResources:
    # One set of scratch memory and streams per process, shared by every index cloned.
    return faiss.StandardGpuResources()


def score_shortlisted(
    probes: TenPrintCylinders,
    gallery: TenPrintCylinders,
    rows: Tensor,
    params: MccParams,
    *,
    fusion: Fusion | None = None,
) -> TenPrintScores:
    """Full MCC of each probe against its own shortlist: ``probes: [P, 10, ·]``, gallery rows
    ``rows: int64 [P, K]`` (of ``gallery``, which may live in host memory: only the P·K
    shortlisted subjects' fingers are copied to the probes' device, a chunk at a time) -> scores
    ``[P, K]``, column j of probe p being gallery row ``rows[p, j]``.

    P·K pairs, not the P·(union of the shortlists) that one
    :func:`~gpu_kernels.fusion.score_tenprints` call would score (probes in one batch rarely
    share candidates): one batched pass per finger position for the whole micro-batch
    (:func:`gpu_kernels.similarity.score_fingers_paired`) where that is the faster arithmetic
    (see :func:`_paired`). The ten positions are fused once, over each probe's candidates, by
    ``fusion`` (default: the shipped evidence model), as :func:`~gpu_kernels.fusion.score_tenprints` does.
    """
    rows = rows.to(gallery.device)
    per_finger = torch.stack(
        map_positions(lambda f: _paired(probes.fingers[f], gallery.fingers[f], rows, params), probes.device),
        dim=-1,
    )  # [P, K, 10]
    both = probes.present[:, None, :] & gallery.present[rows].to(probes.device)  # [P, K, 10]
    counts = torch.stack([f.valid[rows].sum(-1) for f in gallery.fingers], dim=-1).to(probes.device)
    return tenprint_scores(per_finger, both, probes.valid_counts(), counts, fusion)


def _paired(probe: CylinderSet, gallery: CylinderSet, rows: Tensor, params: MccParams) -> Tensor:
    """``[P, K]`` scores of each probe finger against its own candidates, by the arithmetic that
    is fastest where the products run: one batched pass when bit products are float32 there
    (CUDA, or a CPU where float32 measured faster); one 2-D pass per probe when they are int8,
    since torch has no batched int8 product and the float32 batched pass measured 0.57x the
    per-probe int8 passes on a 2-core AVX2 CPU (P = 16, K = 100)."""
    if len(probe) <= 1 or bit_operand_dtype(probe.device) != torch.int8:
        return score_fingers_paired(probe, gallery, rows, params)
    return torch.stack(
        [
            score_fingers(probe.select(slice(i, i + 1)), gallery.select(rows[i]).to(probe.device), params)[0]
            for i in range(len(probe))
        ]
    )
