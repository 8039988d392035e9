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
    if bits.dtype != torch.bool:
        bits = bits != 0
    # Or-ing the 8 shifted byte planes is several times faster than a weighted sum in int32.
    planes = bits.view(torch.uint8).reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8)
    packed = planes[..., 0] << 7
    for i in range(1, 8):
        packed |= planes[..., i] << (7 - i)
    return packed


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
    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor of the set, in field order."""
        return (self.values, self.cell_valid, self.valid, self.theta, self.xy, self.counts)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (what a gallery shard costs in device memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

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

    def compacted(self, index: Tensor | None = None) -> CylinderSet:
        """Each finger's valid cylinders first, in their original order, and M cut to the most
        valid cylinders of any finger (at least 1). What scoring needs and no more: an invalid
        cylinder matches nothing, and keeping the valid ones in order keeps every ranking of
        pairs (and its ties) as it was.

        ``index`` (``int64 [K]``): of the fingers it picks only, as ``select(index).compacted()``
        gives them but in one gather of whole cylinder rows (about half the bytes moved).
        """
        valid = self.valid if index is None else self.valid[index.to(self.device)]
        n_valid = valid.sum(-1)
        count, m_in = valid.shape
        m = max(1, int(n_valid.max())) if count else 1
        if index is None and m == m_in and bool(valid.all()):
            return self
        if m_in < m:  # no minutiae at all: one invalid, all-zero cylinder each
            return (self if index is None else self.select(index)).padded(m)
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)[:, :m]
        fingers = torch.arange(count, device=self.device) if index is None else index.to(self.device)
        flat = (fingers[:, None] * m_in + order).reshape(-1)

        def take(t: Tensor) -> Tensor:
            if not t.is_contiguous():  # a view: flattening it would copy all of it
                return t[fingers[:, None], order]
            # Whole rows by index_select: measured ~3x advanced indexing, ~8x a select then gather.
            rest = t.shape[2:]
            return t.reshape(-1, *rest).index_select(0, flat).reshape(count, m, *rest)

        return CylinderSet(
            values=take(self.values),
            cell_valid=take(self.cell_valid),
            valid=torch.arange(m, device=self.device)[None, :] < n_valid[:, None],
            theta=take(self.theta),
            xy=take(self.xy),
            counts=self.counts if index is None else self.counts[fingers],
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


def convex_hulls(
    points: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Counter-clockwise convex hulls (right-handed frame) of n point sets at once.

    ``points: [n, K, 2]`` where the first ``counts[f]`` rows of finger ``f`` are used ->
    ``(hulls [n, H, 2], sizes [n])``, each hull in its first ``sizes[f]`` rows (the rest 0).
    Andrew's monotone chain with every finger advancing in lock step, so the Python loop runs
    over point positions, not fingers. Duplicates and collinear points are dropped: size >= 3
    is a proper polygon, 1 or 2 a degenerate set (one point, or all on a line), 0 no points.
    The turn test is the same float64 expression, on the same triples, as a per-finger chain.
    """
    n, k, _ = points.shape
    if k == 0:
        return np.zeros((n, 1, 2)), np.zeros(n, np.int64)
    rows = np.arange(n)
    present = np.arange(k)[None, :] < counts[:, None]
    # Sort each finger's points by (x, y), absent rows last; then drop exact duplicates.
    order = np.lexsort((points[..., 1], points[..., 0], ~present), axis=-1)
    pts = np.take_along_axis(points, order[..., None], axis=1)
    keep = np.take_along_axis(present, order, axis=1)
    keep[:, 1:] &= ~(pts[:, 1:] == pts[:, :-1]).all(-1)
    pts = np.take_along_axis(pts, np.argsort(~keep, axis=-1, kind="stable")[..., None], axis=1)
    distinct = keep.sum(-1)

    def chain(reverse: bool) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        # One half of the hull: stack[f, :length[f]] holds indices into pts[f].
        stack = np.zeros((n, k + 1), np.int64)
        length = np.zeros(n, np.int64)
        for t in range(int(distinct.max(initial=0))):
            j = distinct - 1 - t if reverse else np.full(n, t)
            active = (j >= 0) & (j < distinct)
            j = np.clip(j, 0, k - 1)
            px, py = pts[rows, j, 0], pts[rows, j, 1]
            while True:
                a = pts[rows, stack[rows, np.maximum(length - 1, 0)]]
                o = pts[rows, stack[rows, np.maximum(length - 2, 0)]]
                cross = (a[:, 0] - o[:, 0]) * (py - o[:, 1]) - (a[:, 1] - o[:, 1]) * (px - o[:, 0])
                pop = active & (length >= 2) & (cross <= 0)
                if not pop.any():
                    break
                length -= pop
            stack[rows[active], length[active]] = j[active]
            length += active
        return stack, length

    lower, n_lower = chain(reverse=False)
    upper, n_upper = chain(reverse=True)
    # lower[:-1] + upper[:-1], except that 1 or 2 distinct points are their own hull.
    sizes = np.where(distinct <= 2, distinct, n_lower + n_upper - 2)
    h = int(max(1, sizes.max(initial=0)))
    q = np.arange(h)[None, :]
    from_lower = np.take_along_axis(lower, np.minimum(q, k), axis=1)
    from_upper = np.take_along_axis(upper, np.clip(q - (n_lower - 1)[:, None], 0, k), axis=1)
    idx = np.where(q < (n_lower - 1)[:, None], from_lower, from_upper)
    idx = np.where((distinct <= 2)[:, None], np.minimum(q, 1), idx)
    hulls = np.take_along_axis(pts, idx[..., None], axis=1)
    hulls[q[0][None, :] >= sizes[:, None]] = 0.0
    return hulls, sizes


def convex_hull(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Counter-clockwise convex hull (right-handed frame) of ``points: [K, 2]`` -> ``[H, 2]``.

    Collinear points are dropped, so H >= 3 means a proper polygon, and H is 1 or 2 for a
    degenerate set (one point, or all on a line). One finger of :func:`convex_hulls`.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(1, -1, 2)
    hulls, sizes = convex_hulls(pts, np.array([pts.shape[1]], np.int64))
    return hulls[0, : int(sizes[0])]


def _hull_edges(hulls: npt.NDArray[np.float64], sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """``[n, H, 2, 2]`` CCW edges (start, end) of padded hulls; rows past a hull's size are
    zero-length edges on its first vertex, and a finger with no hull gets edges far away."""
    h = hulls.shape[1]
    q = np.arange(h)[None, :]
    nxt = np.take_along_axis(hulls, np.where(q + 1 < sizes[:, None], q + 1, 0)[..., None], axis=1)
    inner = (q < sizes[:, None])[..., None]
    edges = np.stack([np.where(inner, hulls, hulls[:, :1]), np.where(inner, nxt, hulls[:, :1])], axis=2)
    edges[sizes == 0] = 1e9
    return edges


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


def _points_in_enlarged_hull(
    points: Tensor, edges: Tensor, hull_size: Tensor, omega: float, chunk_bytes: int
) -> Tensor:
    """:func:`_in_enlarged_hull` for one point per row: ``points: [P, 2]``, ``edges: [P, H, 2, 2]``,
    ``hull_size: [P]`` -> ``bool [P]``, the same answer computed for fewer points.

    The inside test is the same expression. Points outside by more than ``omega + 1`` px from
    some edge's line are outside the enlarged hull (the 1 px dwarfs float32 error), so only the
    rest pay for the distance computation.
    """
    out = torch.empty(points.shape[0], dtype=torch.bool, device=points.device)
    step = max(1, chunk_bytes // (64 * edges.shape[1]))
    for lo in range(0, points.shape[0], step):
        p, e, hs = points[lo : lo + step], edges[lo : lo + step], hull_size[lo : lo + step]
        a = e[:, :, 0, :]
        edge = e[:, :, 1, :] - a
        rel = p[:, None, :] - a
        cross = edge[..., 0] * rel[..., 1] - edge[..., 1] * rel[..., 0]
        inside = (cross >= 0).all(-1) & (hs >= 3)
        far = ((cross < 0) & (cross * cross > (omega + 1.0) ** 2 * (edge * edge).sum(-1))).any(-1)
        unsure = (~(inside | far)).nonzero(as_tuple=True)[0]
        if unsure.numel():
            inside[unsure] = _in_enlarged_hull(p[unsure, None, :], e[unsure], hs[unsure], omega)[:, 0]
        out[lo : lo + step] = inside
    return out


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

# Stand-in position of a padding neighbour: far beyond every cutoff, so it contributes exact zeros.
_FAR = 1e9


@dataclass(frozen=True)
class _CellGrid:
    """Per (params, device) constants of the cell layout, built once (see :func:`_cell_grid`)."""

    offsets: Tensor  # float32 [Ns], cell centre offsets along one axis, px
    ii: Tensor  # float32 [S], offset along d of each spatial cell
    jj: Tensor  # float32 [S], offset along r of each spatial cell
    disk: Tensor  # bool [S], see disk_mask
    n_disk: int
    near_own: Tensor  # bool [S], disk cells safely within omega of the cylinder's own minutia
    window: int  # side, in cells, of a square that holds every cell within 3σs of a point
    near2: float  # (omega - margin)², "safely within omega"
    reach2: float  # squared distance beyond which a neighbour reaches no disk cell
    exp_floor2: float  # squared offsets above this are clamped (beyond every cutoff)


@functools.lru_cache(maxsize=16)
def _cell_grid(params: MccParams, device: torch.device) -> _CellGrid:
    ns = params.ns
    offsets = (torch.arange(ns, device=device, dtype=torch.float32) - (ns - 1) / 2.0) * params.delta_s
    disk = disk_mask(params)
    off64 = (np.arange(ns) - (ns - 1) / 2.0) * params.delta_s
    radius64 = np.hypot(off64[:, None], off64[None, :]).reshape(-1)
    # "Safely within omega": the margin is far above float32 error on pixel coordinates, so a
    # cell this close to a minutia is certainly inside the enlarged hull, whatever the rounding.
    near = max(params.omega - 1e-2 - 1e-4 * params.omega, 0.0)
    cutoff = 3.0 * params.sigma_s
    reach = (radius64[disk].max() if disk.any() else 0.0) + cutoff
    return _CellGrid(
        offsets=offsets,
        ii=offsets[:, None].expand(ns, ns).reshape(-1),
        jj=offsets[None, :].expand(ns, ns).reshape(-1),
        disk=torch.as_tensor(disk, device=device),
        n_disk=int(disk.sum()),
        near_own=torch.as_tensor(disk & (radius64 <= near), device=device),
        window=min(ns, int(2.0 * cutoff * (1.0 + 1e-6) / params.delta_s) + 1),
        near2=near**2,
        reach2=(reach * (1.0 + 1e-4) + 1e-2) ** 2,
        exp_floor2=4.0 * max(cutoff, params.omega) ** 2,
    )


def _batch_ends(cost: npt.NDArray[np.int64], budget: int) -> list[int]:
    """Splits items sorted by non-decreasing per-item ``cost`` into consecutive batches whose
    size times their largest cost stays within ``budget`` (at least one item each) -> ends."""
    ends: list[int] = []
    lo, n = 0, len(cost)
    while lo < n:
        window = cost[lo : lo + max(1, budget // max(int(cost[lo]), 1))]
        fits = np.arange(1, len(window) + 1) * window <= budget
        lo += max(1, int(fits.sum()))
        ends.append(lo)
    return ends


def encode_fingers(
    templates: Sequence[FingerTemplate | None],
    params: MccParams,
    device: torch.device | str = "cpu",
    *,
    chunk_bytes: int = 64 * _MIB,
) -> CylinderSet:
    """Encodes N finger templates (None = absent finger) as MCC cylinders on ``device``.

    Returns a :class:`CylinderSet` with M = the largest minutia count (at least 1). Fingers are
    taken in order of minutia count, in chunks that pad only to their own largest count, and
    cylinders are then grouped by how many neighbours reach their disk (see
    :func:`_cylinder_cells`); the per-cell sums run as batched matmuls whose intermediates stay
    near ``chunk_bytes``. Bit for bit the same cylinders as summing over every neighbour and
    testing every cell against the whole hull, only faster.
    """
    device = torch.device(device)
    n = len(templates)
    counts = np.array([0 if t is None else t.count for t in templates], np.int64)
    m = int(max(1, counts.max(initial=0)))
    xy = np.zeros((n, m, 2), np.float64)
    theta = np.zeros((n, m), np.float64)
    if counts.sum():
        finger = np.repeat(np.arange(n), counts)
        slot = np.arange(len(finger)) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.concatenate([t.minutiae for t in templates if t is not None and t.count])
        xy[finger, slot] = rows[:, :2]
        theta[finger, slot] = rows[:, 2]
    xy_rh = _right_handed(xy)
    hulls, hull_size = convex_hulls(xy_rh, counts)
    edges = _hull_edges(hulls, hull_size)

    s = params.spatial_cells
    width = params.cells // 8 if params.binary else params.cells
    vdtype = torch.uint8 if params.binary else torch.float32
    values = torch.zeros((n, m, width), dtype=vdtype, device=device)
    cell_valid = torch.zeros((n, m, s // 8), dtype=torch.uint8, device=device)
    valid = torch.zeros((n, m), dtype=torch.bool, device=device)
    order = np.argsort(counts, kind="stable")
    # A chunk holds the [M, M] geometry of its fingers; the heavy tensors are bounded per
    # batch of cylinders inside _encode_chunk.
    lo = 0
    for hi in _batch_ends(48 * np.maximum(counts[order], 1) ** 2, chunk_bytes):
        idx = order[lo:hi]
        lo = hi
        mc = int(counts[idx].max())
        if mc == 0:
            continue
        part = _encode_chunk(
            torch.as_tensor(xy_rh[idx, :mc], dtype=torch.float32, device=device),
            torch.as_tensor(theta[idx, :mc], dtype=torch.float32, device=device),
            torch.as_tensor(counts[idx], device=device),
            torch.as_tensor(edges[idx], dtype=torch.float32, device=device),
            torch.as_tensor(hull_size[idx], device=device),
            params,
            chunk_bytes,
        )
        at = torch.as_tensor(idx, device=device)
        values[at, :mc], cell_valid[at, :mc], valid[at, :mc] = part
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
    counts: Tensor,
    edges: Tensor,
    hull_size: Tensor,
    params: MccParams,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cylinders of n fingers. ``xy: [n, M, 2]`` right-handed, ``theta: [n, M]``, ``counts: [n]``,
    hull ``edges: [n, H, 2, 2]`` and ``hull_size: [n]`` (see :func:`_in_enlarged_hull`).

    Returns packed values, packed spatial validity and cylinder validity (see CylinderSet).
    """
    n, m, _ = xy.shape
    s = params.spatial_cells
    dev = xy.device
    grid = _cell_grid(params, dev)
    slot = torch.arange(m, device=dev)
    present = slot[None, :] < counts[:, None]

    # Unit vectors of each minutia: d along its direction, r 90° clockwise (see module doc).
    cos, sin = torch.cos(theta), torch.sin(theta)
    d = torch.stack([cos, sin], -1)  # [n, M, 2]
    r = torch.stack([sin, -cos], -1)

    rel = xy[:, None, :, :] - xy[:, :, None, :]  # [n, M(m), T, 2] = x_t - x_m
    neighbour = present[:, :, None] & present[:, None, :] & (slot[:, None] != slot[None, :])
    near = torch.linalg.vector_norm(rel, dim=-1) <= params.radius + 3.0 * params.sigma_s
    enough_neighbours = (near & neighbour).sum(-1) >= params.min_m
    # Neighbour t in cylinder m's own frame; distances to cell centres are then separable in
    # (i, j), which is both cheaper and more precise than subtracting absolute positions.
    along = (rel * d[:, :, None, :]).sum(-1)  # [n, M, T]
    across = (rel * r[:, :, None, :]).sum(-1)
    # Only neighbours within R + 3σs can add to a disk cell; the others add exact zeros (and
    # cells outside the disk are invalid anyway), so each cylinder sums over those alone.
    reaches = neighbour & ((rel * rel).sum(-1) <= grid.reach2)
    n_reach = reaches.sum(-1)

    width = params.cells // 8 if params.binary else params.cells
    vdtype = torch.uint8 if params.binary else torch.float32
    values = torch.zeros((n, m, width), dtype=vdtype, device=dev)
    cell_valid = torch.zeros((n, m, s // 8), dtype=torch.uint8, device=dev)
    enough_cells = torch.zeros((n, m), dtype=torch.bool, device=dev)
    cf, cm = present.nonzero(as_tuple=True)
    by_k = torch.sort(n_reach[cf, cm], stable=True).indices
    cf, cm = cf[by_k], cm[by_k]
    k_sorted = n_reach[cf, cm].cpu().numpy()
    # Cylinders with similar neighbour counts share a batch, so each batch pads only to its own K.
    cost = (8 * s + 16 * params.ns) * np.maximum(k_sorted, 1) + 64 * s
    lo = 0
    for hi in _batch_ends(cost, chunk_bytes):
        f, mm = cf[lo:hi], cm[lo:hi]
        k = max(1, int(k_sorted[hi - 1]))
        lo = hi
        # Each cylinder's reaching neighbours first, in their original order (a stable sort):
        # the matmul then adds the same terms in the same order, minus exact zeros.
        nbr = torch.sort((~reaches[f, mm]).to(torch.uint8), dim=-1, stable=True).indices[:, :k]
        pad = torch.arange(k, device=dev)[None, :] >= n_reach[f, mm][:, None]
        part = _cylinder_cells(
            xy[f, mm],
            theta[f, mm],
            d[f, mm],
            r[f, mm],
            torch.gather(along[f, mm], 1, nbr).masked_fill_(pad, _FAR),
            torch.gather(across[f, mm], 1, nbr).masked_fill_(pad, _FAR),
            torch.gather(theta[f], 1, nbr),
            edges[f],
            hull_size[f],
            params,
            chunk_bytes,
        )
        values[f, mm], cell_valid[f, mm], enough_cells[f, mm] = part
    valid = present & enough_cells & enough_neighbours
    return values, cell_valid, valid


def _cylinder_cells(
    xy: Tensor,
    theta: Tensor,
    d: Tensor,
    r: Tensor,
    along: Tensor,
    across: Tensor,
    theta_k: Tensor,
    edges: Tensor,
    hull_size: Tensor,
    params: MccParams,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """C cylinders: ``xy, d, r: [C, 2]`` and ``theta: [C]`` of their minutiae; ``along, across,
    theta_k: [C, K]`` their neighbours in the cylinder frame (padding at ``_FAR``); ``edges:
    [C, H, 2, 2]``, ``hull_size: [C]`` their finger's hull -> packed values ``[C, ·]``, packed
    spatial validity ``uint8 [C, S/8]`` and ``bool [C]`` enough valid cells (min_VC).
    """
    c, k = along.shape
    dev = xy.device
    grid = _cell_grid(params, dev)
    s, nd, ns, w = params.spatial_cells, params.nd, params.ns, grid.window
    cutoff2 = (3.0 * params.sigma_s) ** 2
    # Squared offsets to every row (i) and column (j) of cells; clamping far ones (beyond every
    # cutoff) keeps exp out of its slow underflow path and changes no contribution.
    di2 = ((along[:, :, None] - grid.offsets) ** 2).clamp_(max=grid.exp_floor2)  # [C, K, Ns]
    dj2 = ((across[:, :, None] - grid.offsets) ** 2).clamp_(max=grid.exp_floor2)

    # A neighbour reaches only cells within 3σs: a w x w window of rows and columns (the first
    # row/column in reach, moved inwards at the border). Outside it the contribution is an
    # exact 0, so the Gaussians are evaluated on the window and scattered into zeros.
    ar = torch.arange(w, device=dev)
    rows = (di2 <= cutoff2).to(torch.uint8).argmax(-1).clamp_(max=ns - w)[..., None] + ar  # [C, K, w]
    cols = (dj2 <= cutoff2).to(torch.uint8).argmax(-1).clamp_(max=ns - w)[..., None] + ar
    di2 = torch.gather(di2, 2, rows)
    dj2 = torch.gather(dj2, 2, cols)
    # The spatial Gaussian factorises over (i, j): 2·w exponentials per neighbour, not w².
    norm = 1.0 / (params.sigma_s * math.sqrt(2.0 * math.pi))
    gi = torch.exp(-0.5 * di2 / params.sigma_s**2) * norm
    gj = torch.exp(-0.5 * dj2 / params.sigma_s**2)
    window = gi[:, :, :, None] * gj[:, :, None, :]  # [C, K, w, w]
    window.masked_fill_(di2[:, :, :, None] + dj2[:, :, None, :] > cutoff2, 0.0)
    spatial = torch.zeros((c, k, s), device=dev)
    cell = rows[:, :, :, None] * ns + cols[:, :, None, :]
    spatial.scatter_(2, cell.view(c, k, w * w), window.view(c, k, w * w))

    # Directional contribution: the Gaussian of σd integrated over the section's width.
    d_theta = wrap_angle(theta[:, None] - theta_k)  # [C, K]
    phi = -math.pi + (torch.arange(nd, device=dev, dtype=torch.float32) + 0.5) * params.delta_d
    alpha = wrap_angle(phi[None, None, :] - d_theta[..., None])  # [C, K, Nd]
    scale = 1.0 / (params.sigma_d * math.sqrt(2.0))
    half = params.delta_d / 2.0
    directional = 0.5 * (torch.erf((alpha + half) * scale) - torch.erf((alpha - half) * scale))
    total = torch.bmm(spatial.transpose(1, 2), directional)  # [C, S, Nd]
    del spatial

    # Cell validity: inside the disk of radius R and the convex hull enlarged by omega. A cell
    # safely within omega of a minutia is in it (minutiae lie in their hull); only the others
    # take the hull test, which is the whole-hull computation on fewer points.
    near = grid.near_own[None, :] | _near_minutiae(along, across, params)
    cell_ok = grid.disk[None, :].expand(c, s).clone()
    ci, si = (cell_ok & ~near).nonzero(as_tuple=True)
    if ci.numel():
        centres = xy[ci] + grid.ii[si, None] * d[ci] + grid.jj[si, None] * r[ci]
        cell_ok[ci, si] = _points_in_enlarged_hull(
            centres, edges[ci], hull_size[ci], params.omega, chunk_bytes
        )

    if params.binary:
        values = pack_bits((total >= params.mu_psi).logical_and_(cell_ok[..., None]).reshape(c, s * nd))
    else:
        psi = torch.sigmoid(params.tau_psi * (total - params.mu_psi))
        values = (psi * cell_ok[..., None]).reshape(c, s * nd)
    enough_cells = cell_ok.sum(-1) >= params.min_vc * grid.n_disk
    return values, pack_bits(cell_ok), enough_cells


def _near_minutiae(along: Tensor, across: Tensor, params: MccParams) -> Tensor:
    """``bool [C, S]``: cells safely within omega of one of the points ``along, across: [C, K]``
    (cylinder frame). Row by row, a point covers an interval of columns; the intervals are
    merged with a difference array, so the cost is per (point, row), not per (point, cell).
    """
    c = along.shape[0]
    ns = params.ns
    dev = along.device
    grid = _cell_grid(params, dev)
    rest = grid.near2 - (along[..., None] - grid.offsets) ** 2  # [C, K, Ns]
    half = torch.sqrt(rest.clamp(min=0.0)) / params.delta_s
    centre = across[..., None] / params.delta_s + (ns - 1) / 2.0
    # Columns strictly inside [centre - half, centre + half] (the nudge keeps it conservative).
    first = torch.ceil(centre - half + 1e-4).clamp_(0, ns)
    end = torch.floor(centre + half - 1e-4).clamp_(-1, ns - 1) + 1
    hit = ((rest >= 0) & (first < end)).to(torch.int32)
    row = torch.arange(ns, device=dev) * (ns + 1)
    marks = torch.zeros((c, ns * (ns + 1)), dtype=torch.int32, device=dev)
    marks.scatter_add_(1, (first.to(torch.int64) + row).view(c, -1), hit.view(c, -1))
    marks.scatter_add_(1, (end.to(torch.int64) + row).view(c, -1), -hit.view(c, -1))
    covered = marks.view(c, ns, ns + 1).cumsum(-1)[..., :ns] > 0
    return covered.reshape(c, ns * ns)
