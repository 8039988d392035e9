"""The relaxation step of LSS-R, batched: pair compatibility ρ and the iterated similarities.

LSS-R (Cappelli, Ferrara, Maltoni, TPAMI 2010, Section 5) takes the n_R = min(n_A, n_B) pairs
of cylinders with the highest local similarity and lets every pair be supported by the others
in proportion to how well the two pairs agree geometrically. For pairs t = (a_t, b_t) and
k = (a_k, b_k), with a the probe minutiae and b the gallery ones,

    d1 = | |a_t - a_k| - |b_t - b_k| |                      (distances, px)
    d2 = | dφ(dφ(θa_t, θa_k), dφ(θb_t, θb_k)) |              (relative directions)
    d3 = | dφ(dR(a_t, a_k), dR(b_t, b_k)) |                  (radial angles)
    ρ(t, k) = Z(d1; μ1, τ1) · Z(d2; μ2, τ2) · Z(d3; μ3, τ3),   Z(v; μ, τ) = 1 / (1 + e^{-τ(v - μ)})

where dφ is the angle difference in [-π, π) and dR(m1, m2) = dφ(θ1, direction of the segment
from m1 to m2), both angles in the ISO image convention (so in image coordinates, y down, the
segment's direction is ``atan2(y1 - y2, x2 - x1)``). Then, n_rel times,

    λ_t ← w_R·λ_t + (1 - w_R)·Σ_{k≠t} ρ(t, k)·λ_k / (n_R - 1).

Everything here works on a batch of pair sets ``[..., K]`` (K the padded n_R); the selection of
pairs and the final score live in :mod:`gpu_kernels.similarity`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpu_kernels.cylinders import wrap_angle
from gpu_kernels.params import MccParams

#: Efficiencies are compared on a grid of 2^-16 (~1.5e-5). Many impostor pairs have no support
#: at all and an efficiency of exactly w_R^n_rel plus float noise (1e-9 in float32, 1e-17 in
#: float64); comparing them exactly would pick among them by rounding error, differently on each
#: device and in the reference. On the grid they tie, and the tie goes to the pair of higher λ^0.
EFFICIENCY_RESOLUTION = 2.0**-16

#: Each factor Z of ρ is computed as at least Z(-28) ≈ 7e-13 (2^-40.4): then ρ, a product of three,
#: stays a normal float (>= 2^-121.3), never a subnormal, on which CPUs are many times slower;
#: and a support, an average of ρ·λ over the other pairs, moves by under 1e-12.
Z_FLOOR_ARGUMENT = -28.0
#: :func:`relax` carries λ scaled by 2^64 so that ρ·λ stays normal even for the tiniest ρ and λ;
#: a power of two, so every rounding is the same as unscaled.
_RELAX_SCALE = 2.0**64


def minutia_geometry(xy: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Distances and radial angles among the minutiae of one finger.

    ``xy: [..., M, 2]`` image frame, ``theta: [..., M]`` ISO angles -> (distance, radial), each
    ``[..., M, M]`` with entry ``[t, k]`` |m_t - m_k|, resp. dR(m_t, m_k). Computed once per
    finger, so the ``[P, G, K, K]`` compatibilities need only gathers from them, not
    trigonometry; ρ's relative directions need no table (see :func:`compatibility`).
    """
    dx = xy[..., None, :, 0] - xy[..., :, None, 0]  # x_k - x_t
    dy = xy[..., None, :, 1] - xy[..., :, None, 1]  # y_k - y_t
    distance = torch.sqrt(dx * dx + dy * dy)
    # Image y points down, so the ISO direction of the segment t -> k is atan2(-(y_k - y_t), ...).
    radial = wrap_angle(theta[..., :, None] - torch.atan2(-dy, dx))
    return distance, radial


def _z_of_difference(diff: Tensor, mu: float, tau: float, *, angle: bool) -> Tensor:
    """Z(|d|; μ, τ) in place over the fresh tensor ``diff``: d = diff, or for an angle d =
    dφ(diff), with ``diff`` in (-2π, 2π) where |dφ(x)| = π - | |x| - π | (no remainder to take).
    The sigmoid's argument is first raised to at least :data:`Z_FLOOR_ARGUMENT`."""
    diff.abs_()
    if angle:
        diff.sub_(math.pi).abs_().mul_(-tau).add_(tau * (math.pi - mu))  # τ(π - |·| - μ)
    else:
        diff.sub_(mu).mul_(tau)
    return diff.clamp_(min=Z_FLOOR_ARGUMENT).sigmoid_()


def compatibility(
    distance_a: Tensor,
    distance_b: Tensor,
    radial_a: Tensor,
    radial_b: Tensor,
    rotation: Tensor,
    params: MccParams,
    *,
    transposed: bool = False,
) -> Tensor:
    """ρ(t, k) ``[..., K, K]``, 0 on the diagonal, for pair sets t = (a_t, b_t).

    ``distance_*, radial_*: [..., K, K]`` are each side's :func:`minutia_geometry` restricted to
    the pairs' minutiae (entry ``[t, k]`` from ``[a_t, a_k]``, resp. ``[b_t, b_k]``);
    ``rotation: [..., K]`` is each pair's dφ(θa_t, θb_t), in [-π, π). The relative directions
    need no table: dφ(θa_t, θa_k) - dφ(θb_t, θb_k) ≡ rotation_t - rotation_k (mod 2π), so
    d2 = |dφ(rotation_t - rotation_k)|. ``transposed``: the tables are laid out ``[k, t]``, and
    so is the result, ρ^T.
    """
    if transposed:
        turn = rotation[..., None, :] - rotation[..., :, None]
    else:
        turn = rotation[..., :, None] - rotation[..., None, :]
    rho = _z_of_difference(distance_a - distance_b, params.mu_rho1, params.tau_rho1, angle=False)
    rho.mul_(_z_of_difference(turn, params.mu_rho2, params.tau_rho2, angle=True))
    rho.mul_(_z_of_difference(radial_a - radial_b, params.mu_rho3, params.tau_rho3, angle=True))
    # A pair does not support itself (the sum runs over k ≠ t).
    rho.diagonal(dim1=-2, dim2=-1).zero_()
    return rho


def pair_compatibility(
    xy_a: Tensor, theta_a: Tensor, xy_b: Tensor, theta_b: Tensor, params: MccParams
) -> Tensor:
    """ρ(t, k) for every two pairs of a pair set: ``[..., K, K]``, 0 on the diagonal.

    Pair t joins probe minutia ``(xy_a[..., t, :], theta_a[..., t])`` to gallery minutia
    ``(xy_b[..., t, :], theta_b[..., t])``: ``xy_*: [..., K, 2]`` image frame, ``theta_*:
    [..., K]`` ISO angles, with any leading batch shape.
    """
    distance_a, radial_a = minutia_geometry(xy_a, theta_a)
    distance_b, radial_b = minutia_geometry(xy_b, theta_b)
    return compatibility(distance_a, distance_b, radial_a, radial_b, wrap_angle(theta_a - theta_b), params)


def efficiency_key(efficiency: Tensor) -> Tensor:
    """``int64`` rank key of efficiencies >= 0: the nearest multiple of
    :data:`EFFICIENCY_RESOLUTION` (halves rounded up)."""
    return torch.floor(efficiency.to(torch.float64) / EFFICIENCY_RESOLUTION + 0.5).to(torch.int64)


def relax(lam0: Tensor, rho: Tensor, in_set: Tensor, n_r: Tensor, params: MccParams) -> Tensor:
    """λ^{n_rel}: ``params.n_rel`` relaxation steps of the similarities ``lam0: [..., K]``.

    ``rho: [..., K, K]`` from :func:`pair_compatibility`; ``in_set: bool [..., K]`` marks the
    entries that are pairs (padding and non-matchable pairs stay 0 and support nobody);
    ``n_r: [...]`` is the paper's n_R, whose n_R - 1 normalises the support (1 when n_R = 1, where
    the sum is empty). One batched matmul per step.
    """
    keep = in_set.to(lam0.dtype)
    lam = lam0 * keep * _RELAX_SCALE
    scale = (1.0 - params.w_r) / (n_r.to(lam0.dtype) - 1.0).clamp(min=1.0)
    # Σ_k ρ(t, k)·λ_k as the row vector λ times ρ^T: the fast product when ρ is the transposed
    # view of a contiguous ρ^T, as :func:`gpu_kernels.similarity.lss_r_scores` passes it.
    rho_t = rho.mT
    for _ in range(params.n_rel):
        support = (lam[..., None, :] @ rho_t)[..., 0, :]
        lam = (params.w_r * lam + scale[..., None] * support) * keep
    return lam / _RELAX_SCALE
