"""MCC local similarities and the LSS global score for all (probe, gallery) finger pairs.

For cylinders a, b with values ``a, b`` (0 on invalid cells) and spatial validity ``ma, mb``
the paper's local similarity is

    λ(a, b) = 1 - ||a|b - b|a|| / (||a|b|| + ||b|a||)

where ``a|b`` is ``a`` restricted to the cells valid in both. Every term is a dot product:

    ||a|b||² = Σ_cells a²·mb = (Σ_k a²)·mb      (per spatial cell, Nd times fewer products)
    ||b|a||² = ma·(Σ_k b²)
    ||a|b - b|a||² = ||a|b||² + ||b|a||² - 2 a·b

so one ``[P·Mp, C] @ [C, g·Mg]`` matmul and two over the Ns·Ns spatial cells give every
local similarity of a chunk. For the bit-based variant the squares are the values themselves,
the dot products are popcounts (exact integers in float32), and the formula is the paper's
``1 - sqrt(|a|b XOR b|a|) / (sqrt(|a|b|) + sqrt(|b|a|))``.

Precision: bit-based similarities are exact up to the final square roots. In the float variant
the cancellation in ||a|b||² + ||b|a||² - 2a·b costs up to ~1e-3 of λ near λ = 1 in float32,
which does not change rankings; the tests hold it to 2e-3 against the float64 reference.

Consolidation (``params.consolidation``). ``"lss"``: the mean of the n_P largest local
similarities. ``"lss_r"``: the n_R = min(n_A, n_B) largest go through the relaxation of
:mod:`gpu_kernels.relaxation`, and the score is the mean of the relaxed similarities of the n_P
pairs whose similarity held up best (efficiency λ^{n_rel}/λ^0, compared at the resolution of
:func:`gpu_kernels.relaxation.efficiency_key`). Both divide by n_P even when fewer pairs exist.
Top-k selections rank ties by the lower flat index (for LSS-R efficiencies: the pair of higher
λ^0), so the pairs chosen are well defined, and equal to the reference's, whatever the device's
sort does with ties.

Paired scoring (:func:`score_fingers_paired`, each probe against its own shortlist) runs the same
code: its products are batched over the probes (one ``[Mp, C] @ [C, g·Mg]`` per probe, in one
call), and the consolidation reads which gallery finger is behind each column from a ``[P, g]``
map instead of the shared ``[1, g]`` one. No batched int8 product exists in torch, so on a CPU
where :mod:`gpu_kernels.products` picks int8 for all-pairs scoring, paired products run in
float32 (measured there: ~5x the int8 products' time).

Where the paper's validity and matchability checks are applied:

- cylinder validity, in the encoder (:mod:`gpu_kernels.cylinders`): at least ``min_vc`` of the
  in-disk cells valid, and at least ``min_m`` other minutiae within R + 3σs;
- pair matchability, in :func:`_local` (λ = 0 otherwise): both cylinders valid, directions
  within ``delta_theta``, at least ``min_me`` of the in-disk cells valid in both, and a non-zero
  ||a|b|| + ||b|a||;
- global score, in :func:`lss_scores` / :func:`lss_r_scores`: 0 when either finger has no valid
  cylinder or no pair is matchable; LSS-R relaxes only matchable pairs (λ^0 > 0): a
  non-matchable pair among the top n_R is no pair, it neither gains similarity from the others
  (its efficiency would be λ/0) nor supports them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from gpu_kernels.cylinders import CylinderSet, disk_mask, wrap_angle
from gpu_kernels.params import MccParams
from gpu_kernels.products import bit_operand_dtype, bit_product
from gpu_kernels.relaxation import compatibility, efficiency_key, minutia_geometry, relax

_MIB = 1 << 20
#: LSS-R on the CPU: the temporaries of one block of gallery fingers (see :func:`_cpu_blocks`),
#: small enough to stay in a core's cache, large enough to amortise per-operation overheads.
_CPU_RELAX_BLOCK_BYTES = 8 * _MIB


@dataclass(frozen=True)
class _Operands:
    """Unpacked operands of a finger set: ``values [N, M, C]``, ``energy`` = Σ_k value² per
    spatial cell ``[N, M, S]`` (binary: the count of set bits; ``None`` for a bit-based gallery
    side, which does not need it, see :func:`_local`), spatial validity ``mask [N, M, S]`` (0/1,
    all 0 for an invalid cylinder, so that no product involving it reaches the matchability
    threshold on common cells), ``valid, theta: [N, M]``."""

    values: Tensor
    energy: Tensor | None
    mask: Tensor
    valid: Tensor
    theta: Tensor

    @staticmethod
    def of(cyl: CylinderSet, *, batched: bool = False, gallery: bool = False) -> _Operands:
        """Bit-based cylinders unpack into the device's fastest exact product arithmetic
        (:func:`gpu_kernels.products.bit_operand_dtype`; ``batched``: for batched products);
        float ones stay float32. ``gallery``: the right-hand side of :func:`_local`."""
        p = cyl.params
        dtype = torch.float32
        if p.binary:
            dtype = bit_operand_dtype(cyl.device, batched=batched, max_count=p.cells)
        values = cyl.unpacked_values(dtype)
        n, m, _ = values.shape
        energy = None
        if not (gallery and p.binary):
            squares = values if p.binary else values * values
            # At most nd (6) set bits per spatial cell: the energy fits the operand dtype.
            energy = squares.reshape(n, m, p.spatial_cells, p.nd).sum(-1, dtype=dtype)
        mask = cyl.unpacked_cell_valid(dtype).mul_(cyl.valid[..., None])
        return _Operands(values, energy, mask, cyl.valid, cyl.theta)


@functools.cache
def _disk_cells(params: MccParams) -> int:
    """How many spatial cells lie within R (the matchability threshold's unit)."""
    return int(disk_mask(params).sum())


def _check(probe: CylinderSet, gallery: CylinderSet, params: MccParams, *, same_device: bool = True) -> None:
    # Only the cylinder-shaping fields must agree: a gallery encoded once can be scored under any
    # matchability or consolidation settings.
    if not (probe.params.same_cylinders(params) and gallery.params.same_cylinders(params)):
        raise ValueError("probe and gallery cylinders must be encoded with the params used to score")
    if same_device and probe.device != gallery.device:
        raise ValueError(f"probe on {probe.device} but gallery on {gallery.device}")


def _local(a: _Operands, b: _Operands, params: MccParams, *, paired: bool = False) -> Tensor:
    """Local similarities ``[P, g, Mp, Mg]`` of every cylinder pair; 0 where not matchable.

    All pairs: ``b`` holds g fingers, each compared with every probe finger of ``a``. Paired
    (``paired``): ``b`` holds P·g fingers, probe-major, and probe finger p is compared with its
    own g, rows ``p·g .. p·g + g - 1``; the products are then batched over the probes, one
    ``[Mp, C] @ [C, g·Mg]`` each, and everything after them is the same code on the same layout.

    Products: a·b over the C cells, and over the S spatial cells only (validity is per spatial
    cell, the same in each of its Nd sections): ``[Σ_k a²; ma] @ mb`` gives ||a|b||² and the
    common valid cells, ``ma @ Σ_k b²`` gives ||b|a||² (bit-based: ``[a; ma spread] @ b`` gives
    a·b and ||b|a||² in one product over C). Bit-based values make every product an
    exact count, in float32, float16 or int8 arithmetic alike (:mod:`gpu_kernels.products`), whatever
    the summation order. The elementwise work then runs in place on the products' buffers.
    """
    p, mp, c = a.values.shape
    n_b, mg, _ = b.values.shape
    s = params.spatial_cells
    # A batch of products: one (all pairs: every probe against the same g fingers) or P.
    batch = p if paired else 1
    g = n_b // batch if batch else 0
    rows = p * mp // max(batch, 1)

    def stacked(t: Tensor, width: int) -> Tensor:
        return t.reshape(batch, -1, width)

    if a.energy is None:
        raise ValueError("the probe side's operands need their energy (_Operands.of without gallery)")
    if b.energy is None:
        # Bit-based: ||b|a||² = Σ_s ma_s·Σ_k b_sk = (ma spread over each cell's Nd sections)·b,
        # so it comes out of the a·b product as extra rows, and the gallery's energy is never
        # computed (summing each unpacked cell's Nd bits cost more than these rows do).
        spread = a.mask.repeat_interleave(params.nd, dim=-1)
        both = bit_product(torch.cat([stacked(a.values, c), stacked(spread, c)], 1), stacked(b.values, c))
        dot, norm_b2 = both[:, :rows], both[:, rows:]
    else:
        dot = bit_product(stacked(a.values, c), stacked(b.values, c))  # [batch, rows, cols]
        norm_b2 = bit_product(stacked(a.mask, s), stacked(b.energy, s))
    over_spatial = bit_product(torch.cat([stacked(a.energy, s), stacked(a.mask, s)], 1), stacked(b.mask, s))
    norm_a2, common = over_spatial[:, :rows], over_spatial[:, rows:]

    # ||a|b - b|a|| = sqrt(||a|b||² + ||b|a||² - 2 a·b); rounding can push the float variant's
    # difference slightly below zero, and against an invalid cylinder (its mask all 0, its values
    # not) it is negative in either variant, hence the clamp.
    lam = dot.mul_(-2.0).add_(norm_a2).add_(norm_b2).clamp_(min=0.0).sqrt_()
    denom = norm_a2.sqrt_().add_(norm_b2.sqrt_())
    n_disk = _disk_cells(params)
    # An invalid cylinder has no valid cell (see _Operands), so this also requires both valid.
    matchable = (common >= params.min_me * n_disk).logical_and_(denom > 0)
    lam.div_(denom.clamp_(min=1e-12)).neg_().add_(1.0)
    lam, matchable = lam.reshape(p, mp, g, mg), matchable.reshape(p, mp, g, mg)
    # b's fingers as [batch, 1, g, Mg]: broadcast over all probes, or probe p's own.
    d_theta = wrap_angle(a.theta[:, :, None, None] - b.theta.reshape(batch, 1, g, mg))
    matchable.logical_and_(d_theta.abs_() <= params.delta_theta)
    if params.min_me * n_disk <= 0:  # the common-cell test no longer excludes invalid cylinders
        matchable.logical_and_(a.valid[:, :, None, None] & b.valid.reshape(batch, 1, g, mg))
    return lam.mul_(matchable).permute(0, 2, 1, 3)


def lss_pair_count(n_a: Tensor, n_b: Tensor, params: MccParams) -> Tensor:
    """n_P, how many top local similarities LSS averages, for valid-cylinder counts n_a, n_b.

    ``n_P = min_np + round(Z(min(n_a, n_b); mu_p, tau_p) · (max_np - min_np))`` with Z the
    sigmoid; rounding is half-up. Shapes broadcast; returns int64.
    """
    n = torch.minimum(n_a, n_b).to(torch.float64)
    z = torch.sigmoid(params.tau_p * (n - params.mu_p))
    return params.min_np + torch.floor(z * (params.max_np - params.min_np) + 0.5).to(torch.int64)


def lss_scores(lam: Tensor, n_a: Tensor, n_b: Tensor, params: MccParams) -> Tensor:
    """LSS global scores ``[P, G]`` from local similarities ``lam: [P, G, Mp, Mg]`` and the
    valid-cylinder counts ``n_a: [P]``, ``n_b: [G]`` (the same G fingers for every probe) or
    ``[P, G]`` (each probe's own, as paired scoring has them).

    The mean of the n_P largest local similarities, divided by n_P even when fewer pairs exist
    (so a tiny template cannot score high on one lucky pair); 0 where a side has no valid cylinder.
    """
    p, g = lam.shape[:2]
    n_b = _per_probe(n_b)
    flat = lam.reshape(p, g, lam.shape[2] * lam.shape[3])
    k = params.max_np
    if flat.shape[-1] < k:
        flat = torch.nn.functional.pad(flat, (0, k - flat.shape[-1]))
    top = torch.topk(flat, k, dim=-1, sorted=True).values  # [P, G, k]
    n_p = lss_pair_count(n_a[:, None], n_b, params)  # [P, G]
    ranks = torch.arange(k, device=lam.device)
    score = torch.where(ranks < n_p[..., None], top, 0.0).sum(-1) / n_p.to(top.dtype)
    return torch.where((n_a[:, None] > 0) & (n_b > 0), score, 0.0)


def _per_probe(n_b: Tensor) -> Tensor:
    """Gallery-side values ``[G]`` (shared by all probes) as ``[1, G]``; ``[P, G]`` as they are."""
    return n_b if n_b.dim() == 2 else n_b[None, :]


def _ranked_topk(key: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """Indices ``[..., k]`` of the k largest entries of ``key: int64 [..., N]`` (>= 0), largest
    first, ties to the lower index; entries not ``eligible`` rank below all others.

    The key is packed above the reversed index in one int64, so the order is exact and the same
    on every device (torch.topk leaves the order of ties unspecified).
    """
    n = key.shape[-1]
    reverse_index = torch.arange(n - 1, -1, -1, device=key.device, dtype=torch.int64)
    packed = (key * n).add_(reverse_index)
    if eligible is not None:
        packed = torch.where(eligible, packed, -1 - reverse_index)
    return torch.topk(packed, k, dim=-1, sorted=True).indices


def _float_key(values: Tensor) -> Tensor:
    """An int64 key ordered as ``values`` clamped at 0: float32 bits are monotone for x >= 0."""
    bits = values.to(torch.float32).clamp(min=0.0).contiguous().view(torch.int32)
    return bits.to(torch.int64)


@dataclass(frozen=True)
class _PairGeometry:
    """Both sides' :func:`gpu_kernels.relaxation.minutia_geometry` tables (distance, radial
    angle), each flattened over fingers to ``[N·M·M]`` so that one ``index_select`` at
    finger·M·M + t·M + k gathers entry ``[t, k]`` of a finger."""

    probe: tuple[Tensor, Tensor]
    gallery: tuple[Tensor, Tensor]

    @staticmethod
    def of(probe: CylinderSet, gallery: CylinderSet) -> _PairGeometry:
        a = minutia_geometry(probe.xy, probe.theta)
        b = minutia_geometry(gallery.xy, gallery.theta)
        return _PairGeometry((a[0].reshape(-1), a[1].reshape(-1)), (b[0].reshape(-1), b[1].reshape(-1)))


def lss_r_scores(lam: Tensor, probe: CylinderSet, gallery: CylinderSet, params: MccParams) -> Tensor:
    """LSS-R global scores ``[P, G]`` from local similarities ``lam: [P, G, Mp, Mg]`` of
    ``probe`` (P fingers) against ``gallery`` (G fingers, e.g. one chunk); see the module doc.
    ``lam`` is 0 at invalid cylinders, as :func:`local_similarities` gives it.
    (:func:`score_fingers_paired` consolidates through the same code, see :func:`_lss_r`.)

    Per finger pair: the n_R = min(n_A, n_B) pairs of largest λ (matchable ones only, λ > 0) are
    relaxed by their geometric consistency (:func:`gpu_kernels.relaxation.relax`); the score is
    the sum of the relaxed λ of the n_P pairs of highest efficiency λ^{n_rel}/λ^0, over n_P. 0 when
    a finger has no valid cylinder or no pair is matchable. No loop over pairs: one top-k, gathers
    from each finger's minutia geometry and ``[P, G, K, K]`` compatibilities.

    Off the CPU, all at once with K = min(Mp, Mg), a static bound on n_R (no device sync). On the
    CPU, where reading the counts costs nothing, the gallery fingers go through in blocks of
    similar n_R whose ``[P, g, K, K]`` temporaries stay in cache (see :func:`_cpu_blocks`): K is
    the block's largest n_R, and λ is cut after the block's last valid cylinder.
    """
    return _lss_r(lam, probe, gallery, _pair_rows(len(probe), lam.shape[1], False, lam.device), params)


def _pair_rows(p: int, g: int, paired: bool, device: torch.device) -> Tensor:
    """Which gallery finger is behind column j of probe p's similarities, ``int64 [B, g]``: all
    pairs, ``[1, g]`` (j for every probe); paired, ``[P, g]`` (p·g + j, probe-major)."""
    return torch.arange(p * g if paired else g, device=device).reshape(-1, g)


def _lss_r(lam: Tensor, probe: CylinderSet, gallery: CylinderSet, rows: Tensor, params: MccParams) -> Tensor:
    """:func:`lss_r_scores` where column j of probe p compares with gallery finger ``rows[p, j]``
    (``rows: int64 [B, g]``, B = 1 for every probe alike, or P; see :func:`_pair_rows`)."""
    p, g, mp, mg = lam.shape
    n_a, n_b = probe.valid.sum(-1), gallery.valid.sum(-1)[rows]  # [P], [B, g]
    geometry = _PairGeometry.of(probe, gallery)
    if not _relaxes_in_blocks(lam.device):
        return _lss_r_block(lam, max(1, min(mp, mg)), probe, gallery, rows, n_a, n_b, geometry, params)
    out = torch.empty((p, g), dtype=lam.dtype, device=lam.device)
    for cols, k, width in _cpu_blocks(n_a, n_b, _last_valid(gallery.valid)[rows], mp, mg):
        part = lam[:, cols, :, :width]
        block_rows, block_n_b = rows[:, cols], n_b[:, cols]
        out[:, cols] = _lss_r_block(part, k, probe, gallery, block_rows, n_a, block_n_b, geometry, params)
    return out


def _last_valid(valid: Tensor) -> Tensor:
    """``int64 [N]``: 1 + the index of each finger's last valid cylinder (0 for none)."""
    n, m = valid.shape
    if not m:
        return torch.zeros(n, dtype=torch.int64, device=valid.device)
    return (valid * torch.arange(1, m + 1, device=valid.device)).amax(-1)


def _relaxes_in_blocks(device: torch.device) -> bool:
    """Whether :func:`lss_r_scores` goes block by block (:func:`_cpu_blocks`): on the CPU, where
    the blocks' temporaries then stay in cache and reading the counts that size them costs no
    device sync."""
    return device.type == "cpu"


def _relaxed_bytes(p: int, mp: int, width: int, k: int) -> int:
    """Peak bytes of :func:`_lss_r_block` per gallery finger: ~24 per ``[P, Mp, w]`` λ (a copy and
    the int64 rank keys) and ~32 per ``[P, K, K]`` element (int32 gather indices, four gathered
    geometry values, ρ and the scratch of its factors)."""
    return p * (24 * mp * width + 32 * k * k)


def _cpu_blocks(n_a: Tensor, n_b: Tensor, last_b: Tensor, mp: int, mg: int) -> list[tuple[Tensor, int, int]]:
    """The similarity columns in blocks for :func:`_lss_r` on the CPU: (columns ``int64 [g]``,
    K, width), from the valid counts ``n_a: [P]`` and, per column, ``n_b`` and ``last_b`` (see
    :func:`_last_valid`) of the gallery fingers behind it, ``[B, g]``. Columns go in the order of
    their largest n_R over the probes; a block holds up to :data:`_CPU_RELAX_BLOCK_BYTES` of
    temporaries (:func:`_relaxed_bytes`), or one column; K is its largest n_R (at least 1), width
    the Mg that keeps its valid cylinders (at least 1, at most ``mg``)."""
    g = n_b.shape[1]
    p = n_a.shape[0]
    bound = torch.minimum(n_b, n_a[:, None]).amax(0) if p else torch.zeros(g, dtype=torch.int64)
    last = last_b.amax(0)
    order = torch.argsort(bound, stable=True)
    bounds, lasts = bound[order].tolist(), last[order].tolist()
    blocks = []
    lo = 0
    while lo < g:
        hi, width, k = lo + 1, max(1, lasts[lo]), max(1, bounds[lo])
        while hi < g:
            wider, larger = max(width, lasts[hi]), max(k, bounds[hi])
            if (hi + 1 - lo) * _relaxed_bytes(p, mp, wider, larger) > _CPU_RELAX_BLOCK_BYTES:
                break
            hi, width, k = hi + 1, wider, larger
        blocks.append((order[lo:hi], k, min(mg, width)))
        lo = hi
    return blocks


def _lss_r_block(
    lam: Tensor,
    k: int,
    probe: CylinderSet,
    gallery: CylinderSet,
    fingers: Tensor,
    n_a: Tensor,
    n_b: Tensor,
    geometry: _PairGeometry,
    params: MccParams,
) -> Tensor:
    """:func:`_lss_r` of the similarity columns whose gallery fingers are ``fingers: int64 [B,
    g]`` (see :func:`_pair_rows`), local similarities ``lam: [P, g, Mp, w]`` (w <= Mg) and valid
    counts ``n_b: [B, g]``, with pair sets of K = ``k`` >= their every n_R."""
    return _lss_r_consolidate(lam, k, probe, gallery, fingers, n_a, n_b, geometry, params).score


@dataclass(frozen=True)
class _Consolidated:
    """LSS-R's outcome for a block: ``score [P, g]``; the pairs that carried it, as flat indices
    into each ``[Mp, w]`` similarity matrix, ``pairs [P, g, n_sel]`` (first n_P of them count,
    ``kept``), and their relaxed similarities ``relaxed [P, g, n_sel]``."""

    score: Tensor
    pairs: Tensor
    kept: Tensor
    relaxed: Tensor


def _lss_r_consolidate(
    lam: Tensor,
    k: int,
    probe: CylinderSet,
    gallery: CylinderSet,
    fingers: Tensor,
    n_a: Tensor,
    n_b: Tensor,
    geometry: _PairGeometry,
    params: MccParams,
) -> _Consolidated:
    """:func:`_lss_r_block`, with the pairs that carried each score."""
    p, g, mp, w = lam.shape
    mg = gallery.max_minutiae
    n_r = torch.minimum(n_a[:, None], n_b)  # [P, g]
    flat = lam.reshape(p, g, mp * w)
    top = _ranked_topk(_float_key(flat), k)  # [P, g, K]
    lam0 = torch.gather(flat, -1, top)
    rank = torch.arange(k, device=lam.device)
    in_set = (rank < n_r[..., None]) & (lam0 > 0)
    rows, cols = top // w, top % w
    # ρ needs, for every two pairs (t, k), the geometry of (a_t, a_k) and of (b_t, b_k): gathered
    # from the flat tables at finger·M·M + t·M + k. Laid out [k, t], as ρ^T, the layout in which
    # relax's products are fastest; int32 indices where the tables allow (half the bytes).
    large = max(geometry.probe[0].numel(), geometry.gallery[0].numel()) >= 2**31
    index_type = torch.int64 if large else torch.int32
    rows_i, cols_i = rows.to(index_type), cols.to(index_type)
    base_a = torch.arange(p, device=lam.device, dtype=index_type)[:, None, None] * (mp * mp) + rows_i * mp
    base_b = fingers.to(index_type)[..., None] * (mg * mg) + cols_i * mg
    at = (base_a[..., None, :] + rows_i[..., :, None]).reshape(-1)  # [P·g·K·K]
    side_a = [table.index_select(0, at).reshape(p, g, k, k) for table in geometry.probe]
    del at
    bt = (base_b[..., None, :] + cols_i[..., :, None]).reshape(-1)
    side_b = [table.index_select(0, bt).reshape(p, g, k, k) for table in geometry.gallery]
    del bt
    theta_a = torch.gather(probe.theta, 1, rows.reshape(p, g * k)).reshape(p, g, k)
    theta_b = gallery.theta.reshape(-1)[fingers[..., None] * mg + cols]  # [P, g, K]
    rotation = wrap_angle(theta_a - theta_b)
    rho_t = compatibility(side_a[0], side_b[0], side_a[1], side_b[1], rotation, params, transposed=True)
    del side_a, side_b
    relaxed = relax(lam0, rho_t.mT, in_set, n_r, params)

    efficiency = relaxed / torch.where(in_set, lam0, 1.0)
    n_sel = min(params.max_np, k)
    best = _ranked_topk(efficiency_key(efficiency), n_sel, in_set)  # [P, g, n_sel]
    chosen = torch.gather(relaxed, -1, best)
    n_p = lss_pair_count(n_a[:, None], n_b, params)  # [P, g]
    keep = torch.arange(n_sel, device=lam.device) < n_p[..., None]
    score = torch.where(keep, chosen, 0.0).sum(-1) / n_p.to(chosen.dtype)
    score = torch.where((n_a[:, None] > 0) & (n_b > 0), score, 0.0)
    return _Consolidated(score, torch.gather(top, -1, best), keep & torch.gather(in_set, -1, best), chosen)


def local_similarities(probe: CylinderSet, gallery: CylinderSet, params: MccParams) -> Tensor:
    """Every local similarity, ``[P, G, Mp, Mg]``, for inspection (one chunk, no memory cap).

    Entry ``[p, g, i, j]`` is λ between cylinder i of probe finger p and cylinder j of gallery
    finger g, 0 where the pair is not matchable or either cylinder is invalid.
    """
    _check(probe, gallery, params)
    return _local(_Operands.of(probe), _Operands.of(gallery, gallery=True), params)


def score_fingers(
    probe: CylinderSet,
    gallery: CylinderSet,
    params: MccParams,
    *,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Global scores of all pairs: ``probe: [P, Mp, ·]``, ``gallery: [G, Mg, ·]`` -> ``[P, G]``.

    Consolidated by LSS or LSS-R as ``params.consolidation`` says; scores lie in [0, 1]. The
    gallery is unpacked and scored in chunks of fingers sized so the chunk's float operands and
    ``[P, g, Mp, Mg]`` (LSS-R: also ``[P, g, K, K]``, which on the CPU go block by block, see
    :func:`lss_r_scores`) intermediates stay near ``chunk_bytes``; there is no loop over pairs.
    Both sets must share the cylinder params and the device. ``chunk_bytes`` defaults to
    :func:`default_chunk_bytes` of the device.
    """
    _check(probe, gallery, params)
    out = torch.zeros((len(probe), len(gallery)), dtype=torch.float32, device=probe.device)
    if len(probe) == 0 or len(gallery) == 0:
        return out
    plan = _ChunkPlan.of(probe, gallery.valid.sum(-1)[None], params, chunk_bytes)
    a = _Operands.of(plan.probe)
    for lo, hi in plan.bounds:
        fingers = plan.order[0, lo:hi]
        out[:, fingers] = _score_chunk(a, plan.probe, gallery.compacted(fingers), params)
    return out


def score_fingers_paired(
    probe: CylinderSet,
    gallery: CylinderSet,
    rows: Tensor,
    params: MccParams,
    *,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Each probe finger against its own gallery fingers: ``probe: [P, Mp, ·]``, ``gallery:
    [G, Mg, ·]`` and ``rows: int64 [P, K]`` -> ``[P, K]``, entry ``[p, j]`` the score of probe
    finger p against gallery finger ``rows[p, j]``.

    The scores :func:`score_fingers` gives those pairs (the same local similarities and
    consolidation, up to float summation order), at the cost of P·K pairs rather than P·G, in
    one batched pass: no loop over probes or pairs. The probes' candidates go in chunks of
    similar valid counts, sized by ``chunk_bytes`` as in :func:`score_fingers`; a chunk holds
    the same number of candidates of every probe, and only its fingers are gathered and moved to
    the probes' device, so ``gallery`` may stay in host memory. ``rows`` may repeat fingers.
    """
    _check(probe, gallery, params, same_device=False)
    p = len(probe)
    if rows.dim() != 2 or rows.shape[0] != p:
        raise ValueError(f"rows must be [P, K] for P = {p} probe fingers, got {list(rows.shape)}")
    out = torch.zeros(tuple(rows.shape), dtype=torch.float32, device=probe.device)
    if rows.numel() == 0:
        return out
    rows = rows.to(gallery.device)
    plan = _ChunkPlan.of(probe, gallery.valid[rows].sum(-1), params, chunk_bytes)
    # One probe needs no batched product: it keeps the device's fastest 2-D arithmetic (int8).
    a = _Operands.of(plan.probe, batched=p > 1)
    for lo, hi in plan.bounds:
        cols = plan.order[:, lo:hi]  # [P, k]: column j of probe p is its candidate cols[p, j]
        part = gallery.compacted(torch.gather(rows, 1, cols).reshape(-1)).to(probe.device)
        out.scatter_(1, cols.to(probe.device), _score_chunk(a, plan.probe, part, params, paired=True))
    return out


def _score_chunk(
    a: _Operands, probe: CylinderSet, part: CylinderSet, params: MccParams, *, paired: bool = False
) -> Tensor:
    """Scores ``[P, g]`` of ``probe`` (its operands ``a``) against a chunk of gallery fingers:
    all pairs with g fingers, or paired with P·g fingers, probe-major (see :func:`_local`)."""
    b = _Operands.of(part, batched=paired and len(probe) > 1, gallery=True)
    lam = _local(a, b, params, paired=paired)
    rows = _pair_rows(len(probe), lam.shape[1], paired, lam.device)
    if params.consolidation == "lss_r":
        return _lss_r(lam, probe, part, rows, params)
    return lss_scores(lam, probe.valid.sum(-1), part.valid.sum(-1)[rows], params)


@dataclass(frozen=True)
class _ChunkPlan:
    """How :func:`score_fingers` and :func:`score_fingers_paired` go through a gallery: the
    probes compacted to their valid cylinders; ``order: int64 [B, G]``, each row's gallery
    fingers by valid count (B = 1: the fingers every probe meets; B = P: each probe's own
    candidates, as indices into its row), so that column j holds B fingers; ``widths``, the
    largest valid count of each column (at least 1), non-decreasing; and ``bounds``, the
    ``[lo, hi)`` chunks of columns, each compacted to its largest width ``widths[hi - 1]``."""

    probe: CylinderSet
    order: Tensor
    widths: npt.NDArray[np.int64]
    bounds: list[tuple[int, int]]

    @staticmethod
    def of(probe: CylinderSet, n_valid: Tensor, params: MccParams, chunk_bytes: int | None) -> _ChunkPlan:
        """The plan for gallery fingers of valid counts ``n_valid: [B, G]``."""
        if chunk_bytes is None:
            chunk_bytes = default_chunk_bytes(probe.device)
        # Cost follows the valid cylinders, not the largest padded M: an invalid cylinder matches
        # nothing, so the probes keep only their valid ones (CylinderSet.compacted), and gallery
        # fingers of similar valid counts share a chunk.
        probe = probe.compacted()
        p, mp = len(probe), probe.max_minutiae
        fingers = n_valid.shape[0]  # gallery fingers per column
        relaxing = params.consolidation == "lss_r"
        in_blocks = _relaxes_in_blocks(probe.device)

        def per_column(width: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
            # A gallery finger's unpacked operands (float values, int32 index scratch, mask,
            # energy) and about ten [P, Mp, w] float tensors of products and masks.
            cells = params.cells * 4 + params.cells // 2 + params.spatial_cells * 8
            cost = fingers * width * cells + 40 * p * mp * width
            if relaxing:
                cost += fingers * 32 * width * width  # minutia geometry: three [w, w] tables, scratch
                if not in_blocks:  # the chunk's relaxation at once (on the CPU: block by block)
                    cost += p * (24 * mp * width + 32 * np.minimum(mp, width) ** 2)
            return cost

        fixed = max(_relaxed_bytes(p, mp, mp, mp), _CPU_RELAX_BLOCK_BYTES) if relaxing and in_blocks else 0
        order = torch.argsort(n_valid, dim=1, stable=True)
        widths = np.maximum(torch.gather(n_valid, 1, order).amax(0).cpu().numpy(), 1)
        return _ChunkPlan(probe, order, widths, _chunks(per_column(widths), max(1, chunk_bytes - fixed)))


def default_chunk_bytes(device: torch.device) -> int:
    """How much memory one gallery chunk's temporaries may take on ``device``.

    On the CPU, small enough that the elementwise passes after the products run mostly out of
    cache: scoring 8 realistic probes against 160 gallery fingers took half the CPU time at
    32 MiB of what it took at 256 MiB (16 and 64 MiB were within 10 % of 32; 8 MiB leaves no
    room beside LSS-R's blocks). On CUDA, from the memory free when the search starts
    (:func:`chunk_bytes_for_free`); elsewhere 256 MiB.
    """
    if device.type == "cpu":
        return 32 * _MIB
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return chunk_bytes_for_free(free)
    return 256 * _MIB


def chunk_bytes_for_free(free: int) -> int:
    """A GPU chunk budget from ``free`` device bytes: a quarter of them, between 256 MiB and
    4 GiB. A quarter, because the plan counts the chunk's main temporaries but not the caching
    allocator's fragmentation, and concurrent batches, the faiss index and enrolment share the
    device; 4 GiB is already thousands of gallery fingers per chunk, past which a larger chunk
    only delays the first result; 256 MiB even on a nearly full device, which then fails loudly
    (out of memory) rather than crawling through tiny chunks."""
    return int(min(4096 * _MIB, max(256 * _MIB, free // 4)))


def _chunks(cost: npt.NDArray[np.int64], budget: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of fingers whose cost, each counted at the range's
    largest (``cost`` is non-decreasing), stays within ``budget``; at least one finger each."""
    bounds, lo, n = [], 0, len(cost)
    while lo < n:
        # (hi - lo) · cost[hi - 1] grows with hi: the last hi within budget, by bisection.
        total = np.arange(1, n - lo + 1) * cost[lo:]
        hi = lo + max(1, int(np.searchsorted(total, budget, side="right")))
        bounds.append((lo, hi))
        lo = hi
    return bounds


def score_flops(
    probe: CylinderSet, gallery: CylinderSet, params: MccParams, *, chunk_bytes: int | None = None
) -> int:
    """Floating-point operations of the matrix products :func:`score_fingers` executes for
    ``probe: [P, Mp, ·]`` against ``gallery: [G, Mg, ·]`` (2 per multiply-add), counted over the
    cylinders it really multiplies: the probes' valid ones against each gallery chunk's width.

    Per pair of cylinders, as :func:`_local` runs them: bit-based, two products over the C cells
    (a·b, and ||b|a||² from the spread mask) and two over the S spatial cells (||a|b||², the
    common cells); float-valued, one over C and three over S (||b|a||² from the energy). The
    elementwise work around them is not counted: this is the work a roofline compares.
    """
    if len(probe) == 0 or len(gallery) == 0:
        return 0
    plan = _ChunkPlan.of(probe, gallery.valid.sum(-1)[None], params, chunk_bytes)
    columns = sum((hi - lo) * int(plan.widths[hi - 1]) for lo, hi in plan.bounds)
    rows = len(plan.probe) * plan.probe.max_minutiae
    over_c = 2 if params.binary else 1
    return 2 * rows * columns * (over_c * params.cells + (4 - over_c) * params.spatial_cells)


@dataclass(frozen=True)
class MatchedPairs:
    """Why one probe finger scored what it did against one gallery finger: the global score and
    the minutia pairs that carried it (probe index, gallery index, the pair's similarity in the
    score: relaxed for LSS-R, local for LSS), strongest first."""

    score: float
    pairs: list[tuple[int, int, float]]


def matched_pairs(probe: CylinderSet, gallery: CylinderSet, params: MccParams) -> MatchedPairs:
    """The pairs behind the score of probe finger 0 against gallery finger 0 (one finger each;
    indices are minutia indices of the encoded templates). For examiners and debugging."""
    _check(probe, gallery, params)
    probe, gallery = probe.select(slice(0, 1)), gallery.select(slice(0, 1))
    lam = _local(_Operands.of(probe), _Operands.of(gallery, gallery=True), params)
    mg = lam.shape[-1]
    n_a, n_b = probe.valid.sum(-1), gallery.valid.sum(-1)
    if params.consolidation == "lss_r":
        k = max(1, min(probe.max_minutiae, mg))
        fingers = torch.zeros((1, 1), dtype=torch.int64, device=lam.device)
        geometry = _PairGeometry.of(probe, gallery)
        out = _lss_r_consolidate(lam, k, probe, gallery, fingers, n_a, n_b[None], geometry, params)
        score, flat, kept, values = out.score[0, 0], out.pairs[0, 0], out.kept[0, 0], out.relaxed[0, 0]
    else:
        score = lss_scores(lam, n_a, n_b, params)[0, 0]
        n_p = int(lss_pair_count(n_a, n_b, params)[0])
        values, flat = torch.topk(lam.reshape(-1), min(n_p, lam.numel()))
        kept = values > 0
    pairs = [
        (int(f) // mg, int(f) % mg, float(v))
        for f, v, keep in zip(flat.tolist(), values.tolist(), kept.tolist(), strict=True)
        if keep
    ]
    return MatchedPairs(float(score), sorted(pairs, key=lambda p: -p[2]))
