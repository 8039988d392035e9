"""Synthetic ridge images of the generator's master fingers: 500 ppi, grayscale, dark ridges.

Model (phase-based, after Larkin and Fletcher's "fingerprints as holograms"): the image is
``cos(ψ)`` (dark where ``cos ψ = 1``) with ``ψ = ψ_c + Σ_k φ_k + Σ_k b_k``.

- ``ψ_c``, the continuous phase, is the weighted least-squares integral of the gradient
  ``2π/T · n``, where ``n`` is the unit normal of the master's own ridge flow
  (:meth:`synthetic.fingers.RidgeFlow.orientation`, the Sherlock-Monro model) and ``T`` the
  ridge period (:data:`RIDGE_PERIOD`); solved by conjugate gradients preconditioned with the
  Neumann Poisson solve (DCT). The normal's sign comes from the orientation written as
  ``½·arg((z - core)/(z - delta))`` per core-delta pair, so it jumps only on the segment between
  the pair; the constraints across that segment are dropped (weight 0).
- around each master minutia the phase leans to the plane wave along the minutia's own normal
  (a Gaussian-weighted blend), because a constant-frequency field is no exact gradient and
  ``ψ_c`` would otherwise turn the ridges there by several degrees;
- each minutia ``k`` adds a spiral phase ``φ_k = atan2(ρ·n_k, ρ·d_k)`` (``ρ`` = pixel minus
  minutia, ``d_k`` its direction, ``n_k`` its normal signed like ``∇ψ_c``): one ridge more on
  the side the minutia points to, so a ridge discontinuity sits at the minutia, opening along
  its direction (LEADER reads that direction as the minutia's);
- a local bump ``b_k`` (Gaussian, σ 4 px) sets the phase just ahead of the minutia to a ridge
  centre for an ending and a valley centre for a bifurcation, which picks the type without
  moving the minutia.

Minutiae closer than a ridge period interact (their spirals merge), so a few are lost and the
core-delta segment gives a few spurious ones; the extraction benchmark measures how many.
What is not modelled: pores, scars, pressure and ink variation, sensor noise beyond a little
Gaussian grain. Impressions (:func:`render_impression`) warp the rendered master with the
generator's elastic distortion model, a rotation and a shift, and crop it to a contact area;
they are not the generator's template impressions (whose transforms are not recorded), and
they drop or add no minutiae beyond what the crop and the extractor do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import fft, ndimage
from scipy.sparse import linalg as sparse_linalg

from minutiae.template import FingerTemplate
from synthetic.fingers import FINGER_SEMI_AXES, PatternClass, RidgeFlow, _displace, _smooth_field

#: Ridge period in pixels at 500 ppi (real fingers: about 8-11 px, i.e. 0.4-0.55 mm).
RIDGE_PERIOD = 9.0
#: Where the phase ahead of a minutia is read (px along its direction), and the width of the
#: local phase bump that makes it an ending or a bifurcation.
_AHEAD = 3.0
_BUMP_SIGMA = 4.0
#: Around each minutia the phase leans to the plane wave along the minutia's normal: weight
#: ``_LOCK`` at the minutia against 1 for the global phase, falling off with ``_LOCK_SIGMA`` px.
_LOCK = 4.0
_LOCK_SIGMA = 7.0
#: Conjugate-gradient steps at most for the continuous phase (it converges in far fewer).
_CG_STEPS = 200
#: Gray levels: background, and the mean and half-contrast of the ridge pattern.
_BACKGROUND = 235.0
_MEAN = 128.0
_CONTRAST = 100.0


@dataclass(frozen=True)
class RenderedFinger:
    """A rendered finger: ``image`` ``[H, W]`` uint8 (dark ridges), ``mask`` ``[H, W]`` bool foreground,
    and ``truth``, the minutiae it shows (inside the mask, in the image's own pixel frame)."""

    image: npt.NDArray[np.uint8]
    mask: npt.NDArray[np.bool_]
    truth: FingerTemplate
    ppi: int = 500


def _pairs(flow: RidgeFlow) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Each core with its nearest unused delta (the generator makes as many deltas as cores)."""
    deltas = list(flow.deltas)
    out = []
    for c in flow.cores:
        if not deltas:
            break
        j = min(range(len(deltas)), key=lambda i: math.hypot(deltas[i][0] - c[0], deltas[i][1] - c[1]))
        out.append((c, deltas.pop(j)))
    return out


def ridge_angle(
    flow: RidgeFlow, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Ridge orientation (radians, counter-clockwise as viewed), its sign continuous off core-delta segments.

    Equal to ``flow.orientation`` modulo π.
    """
    if flow.pattern is PatternClass.ARCH or len(flow.cores) != len(flow.deltas):
        return flow.orientation(x, y)
    theta = np.zeros_like(x)
    for (cx, cy), (dx, dy) in _pairs(flow):
        # Viewed frame (y up): the argument of the ratio jumps only where it is a negative real.
        zc = (x - cx) + 1j * (cy - y)
        zd = (x - dx) + 1j * (dy - y)
        theta += 0.5 * np.angle(zc / np.where(zd == 0, 1e-9, zd))
    return theta


def _dct_inverse_laplacian(h: int, w: int) -> Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
    """``r -> ψ`` solving the Neumann 5-point Laplacian ``-Δψ = r`` by DCT-II (mean of ψ zero)."""
    ky = 2.0 - 2.0 * np.cos(np.pi * np.arange(h) / h)
    kx = 2.0 - 2.0 * np.cos(np.pi * np.arange(w) / w)
    denom = ky[:, None] + kx[None, :]
    denom[0, 0] = 1.0

    def solve(r: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        d = fft.dctn(r.reshape(h, w), type=2, norm="ortho") / denom
        d[0, 0] = 0.0
        out: npt.NDArray[np.float64] = fft.idctn(d, type=2, norm="ortho")
        return out

    return solve


def _integrate(
    gx: npt.NDArray[np.float64],
    gy: npt.NDArray[np.float64],
    wx: npt.NDArray[np.float64],
    wy: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Weighted least-squares ``ψ`` with forward differences ``≈`` the half-pixel gradients.

    ``wx`` ``[H, W-1]`` and ``wy`` ``[H-1, W]`` weigh each difference: zero across a core-delta
    segment, where the normal's sign jumps and no phase can follow it. Conjugate gradients on the
    normal equations, preconditioned by the unweighted Poisson solve (DCT), converge in a few
    dozen steps.
    """
    h, w = gx.shape
    hx = 0.5 * (gx[:, 1:] + gx[:, :-1])
    hy = 0.5 * (gy[1:, :] + gy[:-1, :])

    def div(fx: npt.NDArray[np.float64], fy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # Dᵀ of the forward differences: the negative divergence of edge values.
        out = np.zeros((h, w))
        out[:, :-1] -= fx
        out[:, 1:] += fx
        out[:-1, :] -= fy
        out[1:, :] += fy
        return out

    def normal(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        p = v.reshape(h, w)
        return div(wx * np.diff(p, axis=1), wy * np.diff(p, axis=0)).ravel()

    a = sparse_linalg.LinearOperator((h * w, h * w), matvec=normal, dtype=np.float64)
    pre = _dct_inverse_laplacian(h, w)
    m = sparse_linalg.LinearOperator((h * w, h * w), matvec=lambda r: pre(r).ravel(), dtype=np.float64)
    b = div(wx * hx, wy * hy).ravel()
    psi, _info = sparse_linalg.cg(a, b, x0=pre(b).ravel(), M=m, rtol=1e-4, maxiter=_CG_STEPS)
    out: npt.NDArray[np.float64] = psi.reshape(h, w)
    return out


def _window(cx: float, cy: float, h: int, w: int, half: int = 20) -> tuple[slice, slice]:
    """The pixels within ``half`` of a point, clipped to the image (local terms stay local)."""
    return (
        slice(max(int(cy) - half, 0), min(int(cy) + half + 1, h)),
        slice(max(int(cx) - half, 0), min(int(cx) + half + 1, w)),
    )


def ridge_phase(
    flow: RidgeFlow, template: FingerTemplate, *, period: float = RIDGE_PERIOD
) -> npt.NDArray[np.float64]:
    """The phase ``ψ`` ``[H, W]`` of ``template``'s minutiae on ``flow`` (see the module doc)."""
    h, w = template.height, template.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = ridge_angle(flow, x, y)
    k = 2.0 * math.pi / period
    # Image frame (y down): ridge tangent (cos θ, -sin θ), normal (sin θ, cos θ).
    nx, ny = np.sin(theta), np.cos(theta)
    # Constraints across a core-delta segment (the unwrapped angle jumps by π there) are dropped.
    wx = (np.cos(np.diff(theta, axis=1)) > 0).astype(np.float64)
    wy = (np.cos(np.diff(theta, axis=0)) > 0).astype(np.float64)
    psi = _integrate(k * nx, k * ny, wx, wy)
    m = template.minutiae.astype(np.float64)
    if len(m):
        mx, my, mt = m[:, 0], m[:, 1], m[:, 2]
        ix = np.clip(np.rint(mx).astype(int), 0, w - 1)
        iy = np.clip(np.rint(my).astype(int), 0, h - 1)
        # The normal the continuous phase grows along at each minutia (its numerical gradient,
        # so the sign is the one ψ_c really has there).
        gy, gx = (np.asarray(g, np.float64) for g in np.gradient(psi))
        g = np.stack([gx[iy, ix], gy[iy, ix]], axis=1)
        d = np.stack([np.cos(mt), -np.sin(mt)], axis=1)
        # The minutia's own normal (perpendicular to its direction), signed like ψ_c's gradient.
        n = np.stack([-d[:, 1], d[:, 0]], axis=1)
        n *= np.where((n * g).sum(axis=1) < 0, -1.0, 1.0)[:, None]
        # ψ_c only approximates the flow (a unit-frequency field is no gradient), so around each
        # minutia it is blended into the plane wave along the minutia's own normal: the ridges an
        # extractor reads the direction from run the way the generator says.
        num, den = psi.copy(), np.ones_like(psi)
        for j in range(len(m)):
            sl = _window(mx[j], my[j], h, w)
            rx, ry = x[sl] - mx[j], y[sl] - my[j]
            wgt = _LOCK * np.exp(-(rx**2 + ry**2) / (2 * _LOCK_SIGMA**2))
            num[sl] += wgt * (psi[iy[j], ix[j]] + k * (rx * n[j, 0] + ry * n[j, 1]))
            den[sl] += wgt
        psi = num / den
        for j in range(len(m)):
            rx, ry = x - mx[j], y - my[j]
            psi += np.arctan2(rx * n[j, 0] + ry * n[j, 1], rx * d[j, 0] + ry * d[j, 1])
        # The spiral fixes where the extra ridge opens; whether a dark ridge ends there or forks
        # depends on the phase just ahead of the minutia (ridge centre: an ending, whose ridge
        # lies ahead; valley centre: a bifurcation, whose branches enclose a valley ahead). A
        # local bump of width about half a period sets it without moving the minutia.
        ax = np.clip(np.rint(mx + _AHEAD * d[:, 0]).astype(int), 0, w - 1)
        ay = np.clip(np.rint(my + _AHEAD * d[:, 1]).astype(int), 0, h - 1)
        target = np.where(template.kinds == 2, math.pi, 0.0)
        shift = np.angle(np.exp(1j * (target - psi[ay, ax])))
        bumps = np.zeros_like(psi)
        for j in range(len(m)):
            sl = _window(mx[j], my[j], h, w)
            r2 = (x[sl] - mx[j]) ** 2 + (y[sl] - my[j]) ** 2
            bumps[sl] += shift[j] * np.exp(-r2 / (2 * _BUMP_SIGMA**2))
        psi += bumps
    return psi


def finger_mask(template: FingerTemplate, position: int | None = None) -> npt.NDArray[np.bool_]:
    """Foreground: an ellipse around the master's minutiae, the size of the generator's finger."""
    h, w = template.height, template.width
    m = template.minutiae
    cx, cy = (float(m[:, 0].mean()), float(m[:, 1].mean())) if len(m) else (w / 2, h / 2)
    if len(m):
        # The minutiae fill the generator's finger ellipse: their spread gives its axes.
        ax = max(float(np.abs(m[:, 0] - cx).max()) + 12.0, 40.0)
        ay = max(float(np.abs(m[:, 1] - cy).max()) + 12.0, 50.0)
    else:
        ax, ay = FINGER_SEMI_AXES
    y, x = np.mgrid[0:h, 0:w]
    inside: npt.NDArray[np.bool_] = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    return inside


def _to_image(
    psi: npt.NDArray[np.float64], mask: npt.NDArray[np.bool_], rng: np.random.Generator, noise: float
) -> npt.NDArray[np.uint8]:
    # Soft edge so the extractor's segmentation sees a finger border, not a cliff of minutiae.
    soft = ndimage.gaussian_filter(mask.astype(np.float64), 3.0)
    ridges = _MEAN - _CONTRAST * np.cos(psi)  # cos ψ = 1 on a ridge centre: dark
    img = _BACKGROUND + soft * (ridges - _BACKGROUND) + rng.normal(0.0, noise, psi.shape)
    out: npt.NDArray[np.uint8] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def render_master(
    flow: RidgeFlow,
    template: FingerTemplate,
    *,
    seed: int = 0,
    period: float = RIDGE_PERIOD,
    noise: float = 6.0,
) -> RenderedFinger:
    """The ridge image of a master finger (``template`` and its ``flow``), deterministic by ``seed``."""
    psi = ridge_phase(flow, template, period=period)
    mask = finger_mask(template)
    image = _to_image(psi, mask, np.random.default_rng(seed), noise)
    return RenderedFinger(image, mask, _inside(template, mask, template.minutiae.astype(np.float64)))


def _inside(
    template: FingerTemplate, mask: npt.NDArray[np.bool_], m: npt.NDArray[np.float64]
) -> FingerTemplate:
    h, w = mask.shape
    ix, iy = np.rint(m[:, 0]).astype(int), np.rint(m[:, 1]).astype(int)
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    ok[ok] = mask[iy[ok], ix[ok]]
    return FingerTemplate.from_arrays(
        m[ok],
        width=w,
        height=h,
        kinds=template.kinds[ok],
        quality=template.quality[ok],
        resolution_ppi=template.resolution_ppi,
        finger_position=template.finger_position,
    )


def render_impression(
    master: RenderedFinger,
    rng: np.random.Generator,
    *,
    rotation_deg: float = 10.0,
    translation: float = 15.0,
    distortion: tuple[float, float] = (5.0, 12.0),
    contact: tuple[float, float] = (0.75, 0.95),
    noise: float = 8.0,
) -> RenderedFinger:
    """One capture of a rendered master: elastically distorted (the generator's model,
    :func:`synthetic.fingers._displace`, ``distortion`` px at the border, drawn uniformly), rotated
    (σ ``rotation_deg``), moved (σ ``translation`` px), cut to a contact ellipse of the given
    relative size, with fresh grain; ``truth`` is carried through the same mapping.

    Rotation is counter-clockwise as viewed, like the project's angles. ``distortion=(0, 0)``
    gives a rigid move.
    """
    h, w = master.image.shape
    a = math.radians(float(np.clip(rng.normal(0, rotation_deg), -2.5 * rotation_deg, 2.5 * rotation_deg)))
    t = np.clip(rng.normal(0, translation, 2), -2.5 * translation, 2.5 * translation)
    c = np.array([w / 2, h / 2])
    m = master.truth.minutiae.astype(np.float64)
    centre = m[:, :2].mean(axis=0) if len(m) else c
    spread = float(np.sqrt(((m[:, :2] - centre) ** 2).sum(axis=1).max())) if len(m) else 100.0
    field = _smooth_field(rng)
    amplitude = rng.uniform(*distortion)

    def forward(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # Skin stretches first (pinned at the finger centre), then the finger turns and moves.
        # Counter-clockwise as viewed with y down: x' = cos·x + sin·y, y' = -sin·x + cos·y.
        d = _displace(xy, centre, spread, amplitude, field) - c
        out: npt.NDArray[np.float64] = d @ rot.T + c + t
        return out

    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    q = (np.column_stack([x.ravel(), y.ravel()]) - c - t) @ rot + c  # undo the rigid part
    src = q.copy()
    for _ in range(3):  # undo the smooth displacement by fixed-point steps (it is small and slow)
        src = q - (_displace(src, centre, spread, amplitude, field) - src)
    coords = [src[:, 1].reshape(h, w), src[:, 0].reshape(h, w)]
    moved_image = ndimage.map_coordinates(master.image.astype(np.float64), coords, order=1, cval=_BACKGROUND)
    moved_mask = ndimage.map_coordinates(master.mask.astype(np.float64), coords, order=0, cval=0.0) > 0.5
    # The contact area: a smaller ellipse inside the moved finger, off-centre a little.
    ys, xs = np.nonzero(moved_mask)
    scale = rng.uniform(*contact)
    cx, cy = xs.mean() + rng.normal(0, 10), ys.mean() + rng.normal(0, 10)
    ax, ay = (xs.max() - xs.min()) / 2 * scale, (ys.max() - ys.min()) / 2 * scale
    mask = moved_mask & (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0)
    soft = ndimage.gaussian_filter(mask.astype(np.float64), 3.0)
    img = _BACKGROUND + soft * (moved_image - _BACKGROUND) + rng.normal(0.0, noise, (h, w))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    # A point a few pixels ahead of each minutia, mapped alike, gives its new direction.
    ahead = m[:, :2] + 6.0 * np.column_stack([np.cos(m[:, 2]), -np.sin(m[:, 2])])
    new_xy, new_ahead = forward(m[:, :2]), forward(ahead)
    step = new_ahead - new_xy
    truth = _inside(master.truth, mask, np.column_stack([new_xy, np.arctan2(-step[:, 1], step[:, 0])]))
    return RenderedFinger(image, mask, truth)


__all__ = [
    "RIDGE_PERIOD",
    "RenderedFinger",
    "finger_mask",
    "render_impression",
    "render_master",
    "ridge_angle",
    "ridge_phase",
]
