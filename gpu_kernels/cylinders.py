"""Minutia Cylinder-Code local structures, encoded for a batch of fingers as tensors.

Frames. Templates arrive in the image frame (x right, y down, angles counter-clockwise as
the picture is viewed: ISO/IEC 19794-2, see :mod:`minutiae.template`), where a minutia of
angle θ points along ``(cos θ, -sin θ)``. The kernel converts once, in :func:`_right_handed`,
to a right-handed frame ``(x, y') = (x, -y)`` in which the same angle points along
``(cos θ, sin θ)`` and rotations are the usual ``[[cos, -sin], [sin, cos]]``.

Cell layout. Cell ``(i, j, k)`` (0-based, linearised as ``(i·Ns + j)·Nd + k``) has its centre at
``m + Δs·((i - (Ns-1)/2)·d + (j - (Ns-1)/2)·r)`` where ``d`` is the minutia direction and ``r``
the direction 90° clockwise from it as the image is viewed (``(sin θ, -cos θ)`` right-handed).
That is exactly the paper's ``p_ij = [x, y] + Δs·[[cos θ, sin θ], [-sin θ, cos θ]]·[i - (Ns+1)/2,
j - (Ns+1)/2]`` read in image coordinates with ISO angles, so cylinders here and in
:mod:`gpu_kernels.reference` (which uses that formula literally) are comparable bit for bit.
Section ``k`` is centred on the relative angle ``-π + (k + 1/2)·Δd``.

Validity is a property of spatial cells (all Nd sections of a cell share it), so it is stored
per spatial cell: ``[N, M, Ns·Ns/8]`` packed bytes rather than ``C/8``; similarity exploits it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from gpu_kernels.params import MccParams
from minutiae.template import FingerTemplate

_MIB = 1 << 20


# --------------------------------------------------------------------------- bit packing


def pack_bits(bits: Tensor) -> Tensor:
    """Packs 0/1 values along the last axis, 8 to a byte, most significant bit first.

    ``bits: [..., K]`` (any dtype, K a multiple of 8) -> ``uint8 [..., K/8]``; the layout is
    ``numpy.packbits``'s default, so packed cylinders can also be handed to faiss binary indexes.
    """
    k = bits.shape[-1]
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=bits.device)
    grouped = (bits != 0).to(torch.int32).reshape(*bits.shape[:-1], k // 8, 8)
    return (grouped * weights).sum(-1).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _unpack_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    # One gather through a [256, 8] table is cheaper than 8 shift-and-mask passes.
    byte = torch.arange(256, dtype=torch.int32)
    shifts = torch.arange(7, -1, -1, dtype=torch.int32)
    return ((byte[:, None] >> shifts) & 1).to(dtype=dtype, device=device)


def unpack_bits(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [..., K/8]`` -> ``dtype [..., K]`` of 0/1."""
    table = _unpack_table(packed.device, dtype)
    # embedding with int32 indices is the fastest gather on CPU (about 2x a shift-and-mask).
    rows = torch.nn.functional.embedding(packed.to(torch.int32), table)
    return rows.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


# --------------------------------------------------------------------------- the cylinder set


@dataclass(frozen=True)
class CylinderSet:
    """The cylinders of N fingers, padded to M minutiae each.

    - ``values``: binary variant ``uint8 [N, M, C/8]`` bit-packed cell values; float variant
      ``float32 [N, M, C]``. Cells that are invalid hold 0.
    - ``cell_valid``: ``uint8 [N, M, Ns·Ns/8]`` packed validity of each spatial cell.
    - ``valid``: ``bool [N, M]``, cylinder valid (paper's min_VC and min_M rules) and not padding.
    - ``theta``: ``float32 [N, M]`` minutia angles (ISO convention, radians).
    - ``xy``: ``float32 [N, M, 2]`` minutia positions in the image frame (for inspection and
      later consolidation steps that need geometry).
    - ``counts``: ``int64 [N]`` minutiae per finger (0 for an absent finger).
    - ``params``: the parameters these cylinders were encoded with.
    """

    values: Tensor
    cell_valid: Tensor
    valid: Tensor
    theta: Tensor
    xy: Tensor
    counts: Tensor
    params: MccParams

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    @property
    def max_minutiae(self) -> int:
        """M, the padded number of cylinders per finger."""
        return int(self.valid.shape[1])

    @property
    def device(self) -> torch.device:
        return self.valid.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (what a gallery shard costs in device memory)."""
        tensors = (self.values, self.cell_valid, self.valid, self.theta, self.xy, self.counts)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> CylinderSet:
        """The same cylinders on ``device``."""
        return CylinderSet(
            values=self.values.to(device),
            cell_valid=self.cell_valid.to(device),
            valid=self.valid.to(device),
            theta=self.theta.to(device),
            xy=self.xy.to(device),
            counts=self.counts.to(device),
            params=self.params,
        )

    def select(self, index: Tensor | slice) -> CylinderSet:
        """Fingers picked by ``index`` (``int64 [K]`` positions, ``bool [N]`` mask, or a slice,
        which is a view rather than a copy), M unchanged."""
        if isinstance(index, Tensor):
            index = index.to(self.device)
        return CylinderSet(
            values=self.values[index],
            cell_valid=self.cell_valid[index],
            valid=self.valid[index],
            theta=self.theta[index],
            xy=self.xy[index],
            counts=self.counts[index],
            params=self.params,
        )

    def padded(self, m: int) -> CylinderSet:
        """The same fingers with M padded up to ``m`` invalid, all-zero cylinders."""
        extra = m - self.max_minutiae
        if extra < 0:
            raise ValueError(f"cannot pad M={self.max_minutiae} down to {m}")
        if extra == 0:
            return self

        def pad(t: Tensor) -> Tensor:
            filler = torch.zeros((t.shape[0], extra, *t.shape[2:]), dtype=t.dtype, device=t.device)
            return torch.cat([t, filler], dim=1)

        return CylinderSet(
            values=pad(self.values),
            cell_valid=pad(self.cell_valid),
            valid=pad(self.valid),
            theta=pad(self.theta),
            xy=pad(self.xy),
            counts=self.counts,
            params=self.params,
        )

    @staticmethod
    def cat(sets: Sequence[CylinderSet]) -> CylinderSet:
        """Concatenates finger sets (same params and device), padding M to the largest."""
        if not sets:
            raise ValueError("cannot concatenate an empty sequence of cylinder sets")
        params = sets[0].params
        if any(s.params != params for s in sets):
            raise ValueError("cylinder sets were encoded with different parameters")
        m = max(s.max_minutiae for s in sets)
        padded = [s.padded(m) for s in sets]
        return CylinderSet(
            values=torch.cat([s.values for s in padded]),
            cell_valid=torch.cat([s.cell_valid for s in padded]),
            valid=torch.cat([s.valid for s in padded]),
            theta=torch.cat([s.theta for s in padded]),
            xy=torch.cat([s.xy for s in padded]),
            counts=torch.cat([s.counts for s in padded]),
            params=params,
        )

    def unpacked_values(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Cell values as ``dtype [N, M, C]`` (0/1 for the binary variant)."""
        if self.params.binary:
            return unpack_bits(self.values, dtype)
        return self.values.to(dtype)

    def unpacked_cell_valid(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Spatial cell validity as ``dtype [N, M, Ns·Ns]`` of 0/1."""
        return unpack_bits(self.cell_valid, dtype)


# --------------------------------------------------------------------------- geometry helpers


def _right_handed(xy_image: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Image frame (y down) -> right-handed frame (y up): the one place the frames meet."""
    out = xy_image.copy()
    out[..., 1] = -out[..., 1]
    return out


def convex_hull(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Counter-clockwise convex hull (right-handed frame) of ``points: [K, 2]`` -> ``[H, 2]``.

    Andrew's monotone chain; collinear points are dropped, so H >= 3 means a proper polygon,
    and H is 1 or 2 for a degenerate set (one point, or all on a line).
    """
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) <= 2:
        return np.asarray(pts, dtype=np.float64).reshape(-1, 2)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


def _in_enlarged_hull(points: Tensor, edges: Tensor, hull_size: Tensor, omega: float) -> Tensor:
    """Whether each point lies in its finger's convex hull enlarged by ``omega``.

    ``points: [n, K, 2]``; ``edges: [n, H, 2, 2]`` the hull's CCW edges (start, end), padded with
    zero-length edges on a vertex; ``hull_size: [n]`` vertices -> ``bool [n, K]``. A point is in
    the enlarged hull if it is inside the polygon or within ``omega`` of its boundary. Padding
    edges add zero cross products and vertex distances (never below the boundary distance), so
    they change nothing; a degenerate hull (1 or 2 vertices) has no inside, only the margin.
    """
    a = edges[:, None, :, 0, :]  # [n, 1, H, 2]
    edge = edges[:, None, :, 1, :] - a
    rel = points[:, :, None, :] - a  # [n, K, H, 2]
    cross = edge[..., 0] * rel[..., 1] - edge[..., 1] * rel[..., 0]
    inside = (cross >= 0).all(-1) & (hull_size >= 3)[:, None]
    t = ((rel * edge).sum(-1) / (edge * edge).sum(-1).clamp(min=1e-12)).clamp(0.0, 1.0)
    dist = torch.linalg.vector_norm(rel - t[..., None] * edge, dim=-1)
    enlarged: Tensor = inside | (dist.amin(-1) <= omega)
    return enlarged


def wrap_angle(angle: Tensor) -> Tensor:
    """Angle differences normalised to [-π, π) (the paper's dθ), elementwise."""
    wrapped: Tensor = torch.remainder(angle + math.pi, 2.0 * math.pi) - math.pi
    return wrapped


def disk_mask(params: MccParams) -> npt.NDArray[np.bool_]:
    """``bool [Ns·Ns]``: spatial cells whose centre is within R of the cylinder's minutia."""
    offsets = (np.arange(params.ns) - (params.ns - 1) / 2.0) * params.delta_s
    d2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return (d2 <= params.radius**2).reshape(-1)


# --------------------------------------------------------------------------- encoding


def encode_fingers(
    templates: Sequence[FingerTemplate | None],
    params: MccParams,
    device: torch.device | str = "cpu",
    *,
    chunk_bytes: int = 64 * _MIB,
) -> CylinderSet:
    """Encodes N finger templates (None = absent finger) as MCC cylinders on ``device``.

    Returns a :class:`CylinderSet` with M = the largest minutia count (at least 1). The per-cell
    sums run as one batched matmul ``[n·M, Ns·Ns, T] @ [n·M, T, Nd]`` per chunk of n fingers,
    with n chosen so the intermediates stay near ``chunk_bytes``.
    """
    device = torch.device(device)
    n = len(templates)
    counts = [0 if t is None else t.count for t in templates]
    m = max([1, *counts])
    xy = np.zeros((n, m, 2), np.float64)
    theta = np.zeros((n, m), np.float64)
    present = np.zeros((n, m), bool)
    hulls: list[npt.NDArray[np.float64]] = []
    for f, t in enumerate(templates):
        k = counts[f]
        if t is not None and k:
            xy[f, :k] = t.minutiae[:, :2]
            theta[f, :k] = t.minutiae[:, 2]
            present[f, :k] = True
            hulls.append(convex_hull(_right_handed(xy[f, :k])))
        else:
            hulls.append(np.zeros((0, 2)))
    h = max([1, *(len(hh) for hh in hulls)])
    # Hull edges (start, end); an absent finger gets one zero-length edge far away, which no
    # cell of it uses anyway (its cells are invalid for lack of minutiae).
    edges = np.full((n, h, 2, 2), 1e9, np.float64)
    hull_size = np.zeros(n, np.int64)
    for f, hh in enumerate(hulls):
        if len(hh):
            edges[f, :, :, :] = hh[0]
            edges[f, : len(hh), 0] = hh
            edges[f, : len(hh), 1] = np.roll(hh, -1, axis=0)
            hull_size[f] = len(hh)

    s = params.spatial_cells
    # Bytes per finger of the largest intermediates ([M, S, T] float32, a few of them).
    per_finger = 4 * m * s * m * 6 + 4 * m * s * h * 8
    step = max(1, chunk_bytes // max(per_finger, 1))
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        parts.append(
            _encode_chunk(
                torch.as_tensor(_right_handed(xy[lo:hi]), dtype=torch.float32, device=device),
                torch.as_tensor(theta[lo:hi], dtype=torch.float32, device=device),
                torch.as_tensor(present[lo:hi], device=device),
                torch.as_tensor(edges[lo:hi], dtype=torch.float32, device=device),
                torch.as_tensor(hull_size[lo:hi], device=device),
                params,
            )
        )
    if parts:
        values = torch.cat([p[0] for p in parts])
        cell_valid = torch.cat([p[1] for p in parts])
        valid = torch.cat([p[2] for p in parts])
    else:
        width = params.cells // 8 if params.binary else params.cells
        vdtype = torch.uint8 if params.binary else torch.float32
        values = torch.zeros((0, m, width), dtype=vdtype, device=device)
        cell_valid = torch.zeros((0, m, s // 8), dtype=torch.uint8, device=device)
        valid = torch.zeros((0, m), dtype=torch.bool, device=device)
    return CylinderSet(
        values=values,
        cell_valid=cell_valid,
        valid=valid,
        theta=torch.as_tensor(theta, dtype=torch.float32, device=device),
        xy=torch.as_tensor(xy, dtype=torch.float32, device=device),
        counts=torch.as_tensor(counts, dtype=torch.int64, device=device),
        params=params,
    )


def _encode_chunk(
    xy: Tensor,
    theta: Tensor,
    present: Tensor,
    edges: Tensor,
    hull_size: Tensor,
    params: MccParams,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cylinders of n fingers. ``xy: [n, M, 2]`` right-handed, ``theta, present: [n, M]``,
    hull ``edges: [n, H, 2, 2]`` and ``hull_size: [n]`` (see :func:`_in_enlarged_hull`).

    Returns packed values, packed spatial validity and cylinder validity (see CylinderSet).
    """
    n, m, _ = xy.shape
    ns, nd, s = params.ns, params.nd, params.spatial_cells
    dev = xy.device
    offsets = (torch.arange(ns, device=dev, dtype=torch.float32) - (ns - 1) / 2.0) * params.delta_s

    # Unit vectors of each minutia: d along its direction, r 90° clockwise (see module doc).
    cos, sin = torch.cos(theta), torch.sin(theta)
    d = torch.stack([cos, sin], -1)  # [n, M, 2]
    r = torch.stack([sin, -cos], -1)

    # Neighbour t in cylinder m's own frame; distances to cell centres are then separable in
    # (i, j), which is both cheaper and more precise than subtracting absolute positions.
    rel = xy[:, None, :, :] - xy[:, :, None, :]  # [n, M(m), T, 2] = x_t - x_m
    along = (rel * d[:, :, None, :]).sum(-1)  # [n, M, T]
    across = (rel * r[:, :, None, :]).sum(-1)
    di2 = (along[:, :, None, :] - offsets[None, None, :, None]) ** 2  # [n, M, Ns(i), T]
    dj2 = (across[:, :, None, :] - offsets[None, None, :, None]) ** 2  # [n, M, Ns(j), T]
    dist2 = (di2[:, :, :, None, :] + dj2[:, :, None, :, :]).reshape(n, m, s, m)

    not_self = ~torch.eye(m, dtype=torch.bool, device=dev)
    neighbour = present[:, :, None] & present[:, None, :] & not_self  # [n, M, T]
    # The spatial Gaussian factorises over (i, j): 2·Ns exponentials per neighbour, not Ns².
    norm = 1.0 / (params.sigma_s * math.sqrt(2.0 * math.pi))
    gi = torch.exp(-0.5 * di2 / params.sigma_s**2) * norm
    gj = torch.exp(-0.5 * dj2 / params.sigma_s**2)
    g_s = (gi[:, :, :, None, :] * gj[:, :, None, :, :]).reshape(n, m, s, m)
    cutoff = dist2 <= (3.0 * params.sigma_s) ** 2
    spatial = torch.where(cutoff & neighbour[:, :, None, :], g_s, 0.0)

    # Directional contribution: the Gaussian of σd integrated over the section's width.
    d_theta = wrap_angle(theta[:, :, None] - theta[:, None, :])  # [n, M, T]
    phi = -math.pi + (torch.arange(nd, device=dev, dtype=torch.float32) + 0.5) * params.delta_d
    alpha = wrap_angle(phi[None, None, None, :] - d_theta[..., None])  # [n, M, T, Nd]
    scale = 1.0 / (params.sigma_d * math.sqrt(2.0))
    half = params.delta_d / 2.0
    directional = 0.5 * (torch.erf((alpha + half) * scale) - torch.erf((alpha - half) * scale))

    total = torch.bmm(spatial.reshape(n * m, s, m), directional.reshape(n * m, m, nd)).reshape(n, m, s, nd)

    # Cell validity: inside the disk of radius R and the convex hull enlarged by omega.
    ii = offsets[:, None].expand(ns, ns).reshape(-1)
    jj = offsets[None, :].expand(ns, ns).reshape(-1)
    centres = (
        xy[:, :, None, :]
        + ii[None, None, :, None] * d[:, :, None, :]
        + jj[None, None, :, None] * r[:, :, None, :]
    )
    in_hull = _in_enlarged_hull(centres.reshape(n, m * s, 2), edges, hull_size, params.omega).reshape(n, m, s)
    disk = torch.as_tensor(disk_mask(params), device=dev)
    cell_ok = in_hull & disk & present[:, :, None]  # [n, M, S]

    if params.binary:
        cells = (total >= params.mu_psi) & cell_ok[..., None]
        values = pack_bits(cells.reshape(n, m, s * nd))
    else:
        psi = torch.sigmoid(params.tau_psi * (total - params.mu_psi))
        values = (psi * cell_ok[..., None]).reshape(n, m, s * nd)

    enough_cells = cell_ok.sum(-1) >= params.min_vc * int(disk.sum())
    near = torch.linalg.vector_norm(rel, dim=-1) <= params.radius + 3.0 * params.sigma_s
    enough_neighbours = (near & neighbour).sum(-1) >= params.min_m
    valid = present & enough_cells & enough_neighbours
    return values, pack_bits(cell_ok), valid
