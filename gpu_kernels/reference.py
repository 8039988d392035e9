"""A slow, literal MCC: plain loops over cells, neighbours and cylinder pairs.

Written straight from Cappelli, Ferrara, Maltoni (TPAMI 2010), Sections 3-5, to check the
batched kernels against: cylinders, local similarity, LSS and LSS-R (relaxation). It works in
the image frame with ISO angles, where the paper's rotation matrix ``[[cos θ, sin θ], [-sin θ,
cos θ]]`` is a proper rotation (y points down and angles turn counter-clockwise as viewed), so
it shares no geometry code with :mod:`gpu_kernels.cylinders`, which converts to a right-handed
frame instead. Indices below are the paper's 1-based ``i, j, k``; arrays store them 0-based in
the same ``[M, Ns, Ns, Nd]`` order. Everything is float64. Never use it on a hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gpu_kernels.params import MccParams
from gpu_kernels.relaxation import EFFICIENCY_RESOLUTION
from minutiae.template import FingerTemplate


@dataclass(frozen=True)
class ReferenceCylinders:
    """Cylinders of one template: ``values [M, Ns, Ns, Nd]`` (0 on invalid cells),
    ``cell_valid [M, Ns, Ns]``, ``valid [M]``, ``theta [M]`` and the minutiae positions
    ``xy [M, 2]`` in the image frame (needed by LSS-R only, hence optional)."""

    values: npt.NDArray[np.float64]
    cell_valid: npt.NDArray[np.bool_]
    valid: npt.NDArray[np.bool_]
    theta: npt.NDArray[np.float64]
    xy: npt.NDArray[np.float64] | None = None


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
    xy = np.array([(x, y) for x, y, _ in mins], dtype=np.float64).reshape(n, 2)
    return ReferenceCylinders(values, cell_valid, valid, theta, xy)


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


def reference_z(v: float, mu: float, tau: float) -> float:
    """Paper's sigmoid Z(v; μ, τ) = 1 / (1 + e^{-τ(v - μ)})."""
    return 1 / (1 + math.exp(-tau * (v - mu)))


def reference_radial_angle(x1: float, y1: float, theta1: float, x2: float, y2: float) -> float:
    """Paper's dR(m1, m2): the direction of m1 minus that of the segment from m1 to m2.

    In image coordinates (y down) with ISO angles, the segment's direction is
    atan2(y1 - y2, x2 - x1).
    """
    return d_theta(theta1, math.atan2(y1 - y2, x2 - x1))


def reference_compatibility(
    ca: ReferenceCylinders,
    cb: ReferenceCylinders,
    pair_t: tuple[int, int],
    pair_k: tuple[int, int],
    p: MccParams,
) -> float:
    """ρ(t, k): how well pair t = (a_t, b_t) and pair k = (a_k, b_k) agree geometrically."""
    assert ca.xy is not None and cb.xy is not None
    (at, bt), (ak, bk) = pair_t, pair_k
    xa_t, ya_t = ca.xy[at]
    xa_k, ya_k = ca.xy[ak]
    xb_t, yb_t = cb.xy[bt]
    xb_k, yb_k = cb.xy[bk]
    ta_t, ta_k, tb_t, tb_k = (float(v) for v in (ca.theta[at], ca.theta[ak], cb.theta[bt], cb.theta[bk]))
    d1 = abs(math.hypot(xa_t - xa_k, ya_t - ya_k) - math.hypot(xb_t - xb_k, yb_t - yb_k))
    d2 = abs(d_theta(d_theta(ta_t, ta_k), d_theta(tb_t, tb_k)))
    d3 = abs(
        d_theta(
            reference_radial_angle(xa_t, ya_t, ta_t, xa_k, ya_k),
            reference_radial_angle(xb_t, yb_t, tb_t, xb_k, yb_k),
        )
    )
    return (
        reference_z(d1, p.mu_rho1, p.tau_rho1)
        * reference_z(d2, p.mu_rho2, p.tau_rho2)
        * reference_z(d3, p.mu_rho3, p.tau_rho3)
    )


def reference_lss_r_from_gamma(
    gamma: npt.NDArray[np.float64], ca: ReferenceCylinders, cb: ReferenceCylinders, p: MccParams
) -> float:
    """LSS-R from a local similarity matrix Γ ``[Ma, Mb]`` and the two templates' cylinders.

    Pairs are ranked by Γ, ties to the lower (row, column); the top n_R = min(n_A, n_B) that are
    matchable (Γ > 0) are relaxed n_rel times; the score is the mean, over n_P, of the relaxed
    similarities of the n_P pairs of highest efficiency λ^{n_rel}/λ^0, compared on a grid of
    EFFICIENCY_RESOLUTION (ties to the better-ranked pair).
    """
    if ca.xy is None or cb.xy is None:
        raise ValueError("LSS-R needs the minutiae positions (ReferenceCylinders.xy)")
    n_a, n_b = int(ca.valid.sum()), int(cb.valid.sum())
    if n_a == 0 or n_b == 0:
        return 0.0
    n_r = min(n_a, n_b)
    ranked = sorted(
        ((float(gamma[a, b]), a, b) for a in range(gamma.shape[0]) for b in range(gamma.shape[1])),
        key=lambda e: (-e[0], e[1], e[2]),
    )
    pairs = [(a, b) for value, a, b in ranked[:n_r] if value > 0]
    if not pairs:
        return 0.0
    lam0 = [float(gamma[a, b]) for a, b in pairs]
    rho = [[reference_compatibility(ca, cb, pt, pk, p) for pk in pairs] for pt in pairs]
    lam = list(lam0)
    for _ in range(p.n_rel):
        previous = lam
        lam = []
        for t in range(len(pairs)):
            support = sum(rho[t][k] * previous[k] for k in range(len(pairs)) if k != t)
            # n_R - 1 is 0 when n_R = 1, where the sum is empty anyway.
            lam.append(p.w_r * previous[t] + (1 - p.w_r) * support / max(n_r - 1, 1))
    # Efficiencies compared on a grid of EFFICIENCY_RESOLUTION, ties to the better-ranked pair.
    efficiency = [math.floor(lam[t] / lam0[t] / EFFICIENCY_RESOLUTION + 0.5) for t in range(len(pairs))]
    order = sorted(range(len(pairs)), key=lambda t: (-efficiency[t], t))
    n_p = reference_lss_pair_count(n_a, n_b, p)
    return sum(lam[t] for t in order[:n_p]) / n_p


def reference_lss_r_from_cylinders(ca: ReferenceCylinders, cb: ReferenceCylinders, p: MccParams) -> float:
    """LSS-R of two templates' cylinders (Γ computed one pair at a time)."""
    return reference_lss_r_from_gamma(reference_local_matrix(ca, cb, p), ca, cb, p)


def reference_score(a: FingerTemplate, b: FingerTemplate, p: MccParams) -> float:
    """The global score of two templates, consolidated as ``p.consolidation`` says."""
    ca, cb = reference_cylinders(a, p), reference_cylinders(b, p)
    if p.consolidation == "lss_r":
        return reference_lss_r_from_cylinders(ca, cb, p)
    return reference_lss_from_cylinders(ca, cb, p)
