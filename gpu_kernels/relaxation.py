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

import torch
from torch import Tensor

from gpu_kernels.cylinders import wrap_angle
from gpu_kernels.params import MccParams

#: Efficiencies are compared on a grid of 2^-16 (~1.5e-5). Many impostor pairs have no support
#: at all and an efficiency of exactly w_R^n_rel plus float noise (1e-9 in float32, 1e-17 in
#: float64); comparing them exactly would pick among them by rounding error, differently on each
#: device and in the reference. On the grid they tie, and the tie goes to the pair of higher λ^0.
EFFICIENCY_RESOLUTION = 2.0**-16


def _z(v: Tensor, mu: float, tau: float) -> Tensor:
    """The paper's sigmoid Z(v; μ, τ); τ < 0 makes it fall from ~1 to 0 as v passes μ."""
    return torch.sigmoid(tau * (v - mu))


def minutia_geometry(xy: Tensor, theta: Tensor) -> Tensor:
    """Distances, relative directions and radial angles among the minutiae of one finger.

    ``xy: [..., M, 2]`` image frame, ``theta: [..., M]`` ISO angles -> ``[..., M, M, 3]`` whose
    entry ``[t, k]`` is (|m_t - m_k|, dφ(θ_t, θ_k), dR(m_t, m_k)). Computed once per finger, so
    the ``[P, G, K, K]`` compatibilities need only gathers from it, not trigonometry.
    """
    dx = xy[..., None, :, 0] - xy[..., :, None, 0]  # x_k - x_t
    dy = xy[..., None, :, 1] - xy[..., :, None, 1]  # y_k - y_t
    distance = torch.sqrt(dx * dx + dy * dy)
    relative = wrap_angle(theta[..., :, None] - theta[..., None, :])
    # Image y points down, so the ISO direction of the segment t -> k is atan2(-(y_k - y_t), ...).
    radial = wrap_angle(theta[..., :, None] - torch.atan2(-dy, dx))
    return torch.stack([distance, relative, radial], -1)


def compatibility_from_geometry(geometry_a: Tensor, geometry_b: Tensor, params: MccParams) -> Tensor:
    """ρ(t, k) ``[..., K, K]`` (0 on the diagonal) from the two sides' :func:`minutia_geometry`
    restricted to the pairs' minutiae, ``[..., K, K, 3]`` each (pair t = (a_t, b_t))."""
    d1 = (geometry_a[..., 0] - geometry_b[..., 0]).abs()
    d2 = wrap_angle(geometry_a[..., 1] - geometry_b[..., 1]).abs()
    d3 = wrap_angle(geometry_a[..., 2] - geometry_b[..., 2]).abs()
    rho = _z(d1, params.mu_rho1, params.tau_rho1) * _z(d2, params.mu_rho2, params.tau_rho2)
    rho = rho * _z(d3, params.mu_rho3, params.tau_rho3)
    k = rho.shape[-1]
    # A pair does not support itself (the sum runs over k ≠ t).
    return rho * (1.0 - torch.eye(k, dtype=rho.dtype, device=rho.device))


def pair_compatibility(
    xy_a: Tensor, theta_a: Tensor, xy_b: Tensor, theta_b: Tensor, params: MccParams
) -> Tensor:
    """ρ(t, k) for every two pairs of a pair set: ``[..., K, K]``, 0 on the diagonal.

    Pair t joins probe minutia ``(xy_a[..., t, :], theta_a[..., t])`` to gallery minutia
    ``(xy_b[..., t, :], theta_b[..., t])``: ``xy_*: [..., K, 2]`` image frame, ``theta_*:
    [..., K]`` ISO angles, with any leading batch shape.
    """
    return compatibility_from_geometry(
        minutia_geometry(xy_a, theta_a), minutia_geometry(xy_b, theta_b), params
    )


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
    lam = lam0 * keep
    scale = (1.0 - params.w_r) / (n_r.to(lam0.dtype) - 1.0).clamp(min=1.0)
    for _ in range(params.n_rel):
        support = (rho @ lam[..., None])[..., 0]
        lam = (params.w_r * lam + scale[..., None] * support) * keep
    return lam
