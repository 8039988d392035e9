"""A slow, literal MCC: plain loops over cells, neighbours and cylinder pairs.

Written straight from Cappelli, Ferrara, Maltoni (TPAMI 2010), Sections 3-5, to check the
batched kernels against. It works in the image frame with ISO angles, where the paper's
rotation matrix ``[[cos θ, sin θ], [-sin θ, cos θ]]`` is a proper rotation (y points down and
angles turn counter-clockwise as viewed), so it shares no geometry code with
:mod:`gpu_kernels.cylinders`, which converts to a right-handed frame instead. Indices below are
the paper's 1-based ``i, j, k``; arrays store them 0-based in the same ``[M, Ns, Ns, Nd]`` order.
Everything is float64. Never use it on a hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gpu_kernels.params import MccParams
from minutiae.template import FingerTemplate


@dataclass(frozen=True)
class ReferenceCylinders:
    """Cylinders of one template: ``values [M, Ns, Ns, Nd]`` (0 on invalid cells),
    ``cell_valid [M, Ns, Ns]``, ``valid [M]`` and ``theta [M]``."""

    values: npt.NDArray[np.float64]
    cell_valid: npt.NDArray[np.bool_]
    valid: npt.NDArray[np.bool_]
    theta: npt.NDArray[np.float64]


def d_theta(theta1: float, theta2: float) -> float:
    """Paper's dθ: the difference of two angles, in [-π, π)."""
    d = theta1 - theta2
    while d < -math.pi:
        d += 2 * math.pi
    while d >= math.pi:
        d -= 2 * math.pi
    return d


def _gaussian_s(t: float, p: MccParams) -> float:
    return math.exp(-(t * t) / (2 * p.sigma_s**2)) / (p.sigma_s * math.sqrt(2 * math.pi))


def _area_gaussian_d(alpha: float, p: MccParams) -> float:
    """∫ from α-Δd/2 to α+Δd/2 of the normal density of std σd."""

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / (p.sigma_d * math.sqrt(2))))

    return cdf(alpha + p.delta_d / 2) - cdf(alpha - p.delta_d / 2)


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull by gift wrapping (Jarvis march); collinear points on edges are skipped."""
    pts = sorted(set(points))
    if len(pts) <= 2:
        return pts

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    hull = []
    start = pts[0]
    current = start
    while True:
        hull.append(current)
        candidate = pts[0] if pts[0] != current else pts[1]
        for q in pts:
            if q == current:
                continue
            c = cross(current, candidate, q)
            farther = math.dist(current, q) > math.dist(current, candidate)
            if c < 0 or (c == 0 and farther):
                candidate = q
        current = candidate
        if current == start:
            return hull


def _in_enlarged_hull(x: float, y: float, hull: list[tuple[float, float]], omega: float) -> bool:
    """Inside the convex polygon, or within omega of one of its edges."""
    h = len(hull)
    edges = [(hull[e], hull[(e + 1) % h]) for e in range(h)]
    if h >= 3:
        signs = set()
        for (ax, ay), (bx, by) in edges:
            c = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
            if c != 0:
                signs.add(c > 0)
        if len(signs) <= 1:
            return True
    for (ax, ay), (bx, by) in edges:
        ex, ey = bx - ax, by - ay
        length2 = ex * ex + ey * ey
        t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((x - ax) * ex + (y - ay) * ey) / length2))
        if math.hypot(x - (ax + t * ex), y - (ay + t * ey)) <= omega:
            return True
    return False


def reference_cylinders(template: FingerTemplate, p: MccParams) -> ReferenceCylinders:
    """Every cylinder of ``template``, cell by cell and neighbour by neighbour."""
    mins = [(float(x), float(y), float(t)) for x, y, t in template.minutiae]
    n = len(mins)
    hull = _hull([(x, y) for x, y, _ in mins])
    values = np.zeros((n, p.ns, p.ns, p.nd))
    cell_valid = np.zeros((n, p.ns, p.ns), bool)
    valid = np.zeros(n, bool)
    centre = (p.ns + 1) / 2
    in_disk = 0  # cells whose centre is within R; the same count for every cylinder
    for i in range(1, p.ns + 1):
        for j in range(1, p.ns + 1):
            if p.delta_s * math.hypot(i - centre, j - centre) <= p.radius:
                in_disk += 1
    for m, (xm, ym, tm) in enumerate(mins):
        for i in range(1, p.ns + 1):
            for j in range(1, p.ns + 1):
                a, b = i - centre, j - centre
                px = xm + p.delta_s * (math.cos(tm) * a + math.sin(tm) * b)
                py = ym + p.delta_s * (-math.sin(tm) * a + math.cos(tm) * b)
                ok = math.hypot(px - xm, py - ym) <= p.radius and _in_enlarged_hull(px, py, hull, p.omega)
                cell_valid[m, i - 1, j - 1] = ok
                if not ok:
                    continue
                neighbours = [
                    (math.hypot(xt - px, yt - py), tt)
                    for t, (xt, yt, tt) in enumerate(mins)
                    if t != m and math.hypot(xt - px, yt - py) <= 3 * p.sigma_s
                ]
                for k in range(1, p.nd + 1):
                    phi_k = -math.pi + (k - 0.5) * p.delta_d
                    v = sum(
                        _gaussian_s(dist, p) * _area_gaussian_d(d_theta(phi_k, d_theta(tm, tt)), p)
                        for dist, tt in neighbours
                    )
                    if p.binary:
                        values[m, i - 1, j - 1, k - 1] = 1.0 if v >= p.mu_psi else 0.0
                    else:
                        values[m, i - 1, j - 1, k - 1] = 1 / (1 + math.exp(-p.tau_psi * (v - p.mu_psi)))
        near = sum(
            1
            for t, (xt, yt, _) in enumerate(mins)
            if t != m and math.hypot(xt - xm, yt - ym) <= p.radius + 3 * p.sigma_s
        )
        valid[m] = cell_valid[m].sum() >= p.min_vc * in_disk and near >= p.min_m
    theta = np.array([t for _, _, t in mins], dtype=np.float64)
    return ReferenceCylinders(values, cell_valid, valid, theta)


def reference_local_similarity(
    ca: ReferenceCylinders, a: int, cb: ReferenceCylinders, b: int, p: MccParams
) -> float:
    """λ between cylinder ``a`` of ``ca`` and cylinder ``b`` of ``cb``; 0 if not matchable."""
    if not (ca.valid[a] and cb.valid[b]):
        return 0.0
    if abs(d_theta(float(ca.theta[a]), float(cb.theta[b]))) > p.delta_theta:
        return 0.0
    in_disk = 0
    common = 0
    na2 = nb2 = diff2 = 0.0
    for i in range(p.ns):
        for j in range(p.ns):
            if p.delta_s * math.hypot(i - (p.ns - 1) / 2, j - (p.ns - 1) / 2) <= p.radius:
                in_disk += 1
            if not (ca.cell_valid[a, i, j] and cb.cell_valid[b, i, j]):
                continue
            common += 1
            for k in range(p.nd):
                va, vb = float(ca.values[a, i, j, k]), float(cb.values[b, i, j, k])
                na2 += va * va
                nb2 += vb * vb
                diff2 += (va - vb) ** 2
    if common < p.min_me * in_disk:
        return 0.0
    if na2 + nb2 == 0:
        return 0.0
    # Binary: na2, nb2 are popcounts of a|b, b|a and diff2 the popcount of their XOR.
    return 1.0 - math.sqrt(diff2) / (math.sqrt(na2) + math.sqrt(nb2))


def reference_lss_pair_count(n_a: int, n_b: int, p: MccParams) -> int:
    """n_P = min_np + round(Z(min(n_a, n_b)) · (max_np - min_np)), rounding half up."""
    z = 1 / (1 + math.exp(-p.tau_p * (min(n_a, n_b) - p.mu_p)))
    return p.min_np + math.floor(z * (p.max_np - p.min_np) + 0.5)


def reference_local_matrix(
    ca: ReferenceCylinders, cb: ReferenceCylinders, p: MccParams
) -> npt.NDArray[np.float64]:
    """Γ, ``[Ma, Mb]``, one cylinder pair at a time."""
    gamma = np.zeros((len(ca.valid), len(cb.valid)))
    for a in range(len(ca.valid)):
        for b in range(len(cb.valid)):
            gamma[a, b] = reference_local_similarity(ca, a, cb, b, p)
    return gamma


def reference_lss_from_cylinders(ca: ReferenceCylinders, cb: ReferenceCylinders, p: MccParams) -> float:
    """LSS: the mean of the n_P largest entries of Γ (divided by n_P even if fewer exist)."""
    n_a, n_b = int(ca.valid.sum()), int(cb.valid.sum())
    if n_a == 0 or n_b == 0:
        return 0.0
    gamma = reference_local_matrix(ca, cb, p)
    n_p = reference_lss_pair_count(n_a, n_b, p)
    ranked = sorted(gamma.ravel().tolist(), reverse=True)
    return sum(ranked[:n_p]) / n_p


def reference_score(a: FingerTemplate, b: FingerTemplate, p: MccParams) -> float:
    """The LSS global score of two templates."""
    return reference_lss_from_cylinders(reference_cylinders(a, p), reference_cylinders(b, p), p)
