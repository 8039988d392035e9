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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gpu_kernels.cylinders import CylinderSet, disk_mask, wrap_angle
from gpu_kernels.params import MccParams

_MIB = 1 << 20


@dataclass(frozen=True)
class _Operands:
    """Unpacked operands of a finger set: ``values [N, M, C]`` and spatial validity ``mask
    [N, M, S]`` (0/1 float), ``valid, theta: [N, M]``. The probe side also carries ``energy``
    = Σ_k value² ``[N, M, S]`` and ``mask_cells``, the mask repeated over sections ``[N, M, C]``;
    the gallery side, unpacked chunk by chunk, needs neither (see :func:`_local`)."""

    values: Tensor
    mask: Tensor
    valid: Tensor
    theta: Tensor
    energy: Tensor | None = None
    mask_cells: Tensor | None = None

    @staticmethod
    def of(cyl: CylinderSet, *, probe_side: bool) -> _Operands:
        p = cyl.params
        values = cyl.unpacked_values()
        mask = cyl.unpacked_cell_valid()
        if not probe_side:
            return _Operands(values, mask, cyl.valid, cyl.theta)
        n, m, _ = values.shape
        squares = values if p.binary else values * values
        energy = squares.reshape(n, m, p.spatial_cells, p.nd).sum(-1)
        mask_cells = mask.repeat_interleave(p.nd, dim=-1)
        return _Operands(values, mask, cyl.valid, cyl.theta, energy, mask_cells)


def _check(probe: CylinderSet, gallery: CylinderSet, params: MccParams) -> None:
    if probe.params != params or gallery.params != params:
        raise ValueError("probe and gallery cylinders must be encoded with the params used to score")
    if probe.device != gallery.device:
        raise ValueError(f"probe on {probe.device} but gallery on {gallery.device}")


def _local(a: _Operands, b: _Operands, params: MccParams) -> Tensor:
    """Local similarities ``[P, G, Mp, Mg]`` of every cylinder pair; 0 where not matchable.

    ``a`` is the probe side (with ``energy`` and ``mask_cells``), ``b`` a gallery chunk. Products:
    ``[a; ma] @ b`` over C cells gives a·b and ||b|a||² (binary: b² = b) in one matmul, and
    ``[Σ_k a²; ma] @ mb`` over S spatial cells gives ||a|b||² and the common valid cells.
    """
    assert a.energy is not None and a.mask_cells is not None
    p, mp, c = a.values.shape
    g, mg, _ = b.values.shape
    s = params.spatial_cells
    rows = p * mp
    b_values = b.values.reshape(g * mg, c)
    if params.binary:
        over_cells = torch.cat([a.values, a.mask_cells], 0).reshape(2 * rows, c) @ b_values.T
        dot, norm_b2 = over_cells[:rows], over_cells[rows:]
    else:
        dot = a.values.reshape(rows, c) @ b_values.T
        norm_b2 = a.mask_cells.reshape(rows, c) @ (b_values * b_values).T
    over_spatial = torch.cat([a.energy, a.mask], 0).reshape(2 * rows, s) @ b.mask.reshape(g * mg, s).T
    norm_a2, common = over_spatial[:rows], over_spatial[rows:]
    dot, norm_a2, norm_b2, common = (t.reshape(p, mp, g, mg) for t in (dot, norm_a2, norm_b2, common))

    norm_a, norm_b = torch.sqrt(norm_a2), torch.sqrt(norm_b2)
    # Rounding can push the float variant's difference slightly below zero; clamp.
    diff = torch.sqrt((norm_a2 + norm_b2 - 2.0 * dot).clamp(min=0.0))
    denom = norm_a + norm_b
    lam = 1.0 - diff / denom.clamp(min=1e-12)

    n_disk = int(disk_mask(params).sum())
    d_theta = wrap_angle(a.theta[:, :, None, None] - b.theta[None, None])
    matchable = (
        (d_theta.abs() <= params.delta_theta)
        & (common >= params.min_me * n_disk)
        & (denom > 0)
        & a.valid[:, :, None, None]
        & b.valid[None, None]
    )
    return torch.where(matchable, lam, 0.0).permute(0, 2, 1, 3)


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
    valid-cylinder counts ``n_a: [P]``, ``n_b: [G]``.

    The mean of the n_P largest local similarities, divided by n_P even when fewer pairs exist
    (so a tiny template cannot score high on one lucky pair); 0 where a side has no valid cylinder.
    """
    p, g = lam.shape[:2]
    flat = lam.reshape(p, g, lam.shape[2] * lam.shape[3])
    k = params.max_np
    if flat.shape[-1] < k:
        flat = torch.nn.functional.pad(flat, (0, k - flat.shape[-1]))
    top = torch.topk(flat, k, dim=-1, sorted=True).values  # [P, G, k]
    n_p = lss_pair_count(n_a[:, None], n_b[None, :], params)  # [P, G]
    ranks = torch.arange(k, device=lam.device)
    score = torch.where(ranks < n_p[..., None], top, 0.0).sum(-1) / n_p.to(top.dtype)
    return torch.where((n_a[:, None] > 0) & (n_b[None, :] > 0), score, 0.0)


def local_similarities(probe: CylinderSet, gallery: CylinderSet, params: MccParams) -> Tensor:
    """Every local similarity, ``[P, G, Mp, Mg]``, for inspection (one chunk, no memory cap).

    Entry ``[p, g, i, j]`` is λ between cylinder i of probe finger p and cylinder j of gallery
    finger g, 0 where the pair is not matchable or either cylinder is invalid.
    """
    _check(probe, gallery, params)
    return _local(_Operands.of(probe, probe_side=True), _Operands.of(gallery, probe_side=False), params)


def score_fingers(
    probe: CylinderSet,
    gallery: CylinderSet,
    params: MccParams,
    *,
    chunk_bytes: int = 256 * _MIB,
) -> Tensor:
    """LSS global scores of all pairs: ``probe: [P, Mp, ·]``, ``gallery: [G, Mg, ·]`` -> ``[P, G]``.

    Scores lie in [0, 1]. The gallery is unpacked and scored in chunks of fingers sized so the
    chunk's float operands and ``[P, g, Mp, Mg]`` intermediates stay near ``chunk_bytes``; there
    is no loop over pairs. Both sets must share ``params`` and device.
    """
    _check(probe, gallery, params)
    a = _Operands.of(probe, probe_side=True)
    n_a = probe.valid.sum(-1)
    n_b = gallery.valid.sum(-1)
    p, mp = probe.valid.shape
    g, mg = gallery.valid.shape
    # Per gallery finger: its unpacked operands (float values, int32 index scratch, mask) and
    # about ten [P, Mp, Mg] float tensors of products and masks.
    per_finger = mg * (params.cells * 4 + params.cells // 2 + params.spatial_cells * 4) + 10 * 4 * p * mp * mg
    step = max(1, chunk_bytes // max(per_finger, 1))
    out = torch.zeros((p, g), dtype=torch.float32, device=probe.device)
    for lo in range(0, g, step):
        hi = min(g, lo + step)
        part = gallery.select(slice(lo, hi))
        lam = _local(a, _Operands.of(part, probe_side=False), params)
        out[:, lo:hi] = lss_scores(lam, n_a, n_b[lo:hi], params)
    return out


def score_flops(probe: CylinderSet, gallery: CylinderSet, params: MccParams) -> int:
    """Floating-point operations of the matrix products :func:`score_fingers` executes for
    ``probe: [P, Mp, ·]`` against ``gallery: [G, Mg, ·]`` (2 per multiply-add, padded M as run).

    Two products per pair of cylinders over the C cells (binary: a·b and ||b|a||² stacked; the
    float variant also two) and two over the S spatial cells (||a|b||² and the common cells).
    The elementwise work around them is not counted: this is the work a roofline compares.
    """
    p, mp = probe.valid.shape
    g, mg = gallery.valid.shape
    return 2 * (2 * p * mp) * (g * mg) * (params.cells + params.spatial_cells)
