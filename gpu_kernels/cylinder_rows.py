"""The full tier in host memory: subjects' bit-packed cylinders one row per minutia, no padding.

A gallery padded to its largest finger at every position holds about 170 KB per subject where
its minutiae need about 90 KB, and a padded gallery of 100,000 subjects does not fit next to
anything else in the memory of a small node. So the full tier is kept in this *row layout*, the
layout of :mod:`gpu_kernels.cylinder_file` (there on disk and memory-mapped, here in host
arrays), and a search gathers the subjects it scores into padded :class:`CylinderSet` tensors on
its device: the shortlisted candidates of a batch, or the gallery a chunk at a time.

Per finger position: ``counts int64 [S]`` minutiae per subject, ``offsets int64 [S]`` of its
first row, and the arrays ``values uint8 [R, C/8]``, ``cells uint8 [R, Ns·Ns/8]``, ``valid bool
[R]``, ``theta float32 [R]``, ``xy float32 [R, 2]``; plus ``present bool [S, 10]``. Only the
bit-packed variant is kept this way (float cylinders are 32 times larger and are for study).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from gpu_kernels.cylinders import CylinderSet
from gpu_kernels.fusion import TenPrintCylinders
from gpu_kernels.params import MccParams

FIELDS = ("values", "cells", "valid", "theta", "xy")
Array = npt.NDArray[Any]


def field_shapes(params: MccParams) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Per field, the shape of one row and its dtype."""
    return {
        "values": ((params.cells // 8,), np.dtype(np.uint8)),
        "cells": ((params.spatial_cells // 8,), np.dtype(np.uint8)),
        "valid": ((), np.dtype(np.bool_)),
        "theta": ((), np.dtype(np.float32)),
        "xy": ((2,), np.dtype(np.float32)),
    }


@dataclass(frozen=True)
class PositionRows:
    """The rows of one finger position: subject ``s`` owns rows ``[offsets[s], offsets[s] + counts[s])``."""

    counts: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    arrays: Mapping[str, Array]


@dataclass(frozen=True)
class CylinderRows:
    """S subjects' cylinders in the row layout (read-only; arrays may be memory-mapped)."""

    params: MccParams
    present: npt.NDArray[np.bool_]
    positions: tuple[PositionRows, ...]

    def __len__(self) -> int:
        return int(self.present.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the subjects' rows, counts and offsets (what the tier holds for them)."""
        total = self.present.nbytes
        for pos in self.positions:
            total += pos.counts.nbytes + pos.offsets.nbytes
            rows = int(pos.counts.sum())
            total += sum(rows * a[:1].nbytes for a in pos.arrays.values() if len(a))
        return total

    def counts(self, rows: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.int64]:
        """Minutiae per finger, ``int64 [n, 10]`` for ``rows`` (default: every subject)."""
        index: Any = slice(None) if rows is None else rows
        return np.stack([pos.counts[index] for pos in self.positions], axis=-1)

    def select(
        self,
        subjects: Tensor | npt.NDArray[np.int64],
        device: torch.device | str = "cpu",
        params: MccParams | None = None,
    ) -> TenPrintCylinders:
        """The cylinders of ``subjects`` (rows, any order, repeats allowed) on ``device``, each
        position padded to the largest selected finger. Touches only those subjects' rows.

        ``params`` labels the result with other matching settings (consolidation, min_me, ...)
        than these rows'; its cylinder-shaping fields must be the same."""
        if params is not None and not params.same_cylinders(self.params):
            raise ValueError("these cylinders were encoded with other cylinder parameters")
        rows = np.asarray(
            subjects.cpu().numpy() if isinstance(subjects, Tensor) else subjects, dtype=np.int64
        )
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"subject rows must lie in [0, {len(self)})")
        label = params or self.params
        fingers = tuple(_gather(pos, rows, device, label) for pos in self.positions)
        present = torch.from_numpy(self.present[rows].copy()).to(device)
        return TenPrintCylinders(fingers, present)


def _gather(
    pos: PositionRows, rows: npt.NDArray[np.int64], device: torch.device | str, params: MccParams
) -> CylinderSet:
    counts = pos.counts[rows]
    m = max(1, int(counts.max(initial=0)))
    # Where each selected minutia goes in the padded [n, m] layout, and which row it comes from:
    # only real rows are read (about half of a padded gallery), into zeros that stay padding.
    real = np.arange(m)[None, :] < counts[:, None]
    dst = np.flatnonzero(real)
    src = (pos.offsets[rows][:, None] + np.arange(m)[None, :])[real]

    def gather(field: str) -> Tensor:
        array = pos.arrays[field]
        out = np.zeros((len(rows) * m, *array.shape[1:]), dtype=array.dtype)
        if src.size:
            out[dst] = array[src]
        return torch.from_numpy(out.reshape(len(rows), m, *array.shape[1:])).to(device)

    return CylinderSet(
        values=gather("values"),
        cell_valid=gather("cells"),
        valid=gather("valid"),
        theta=gather("theta"),
        xy=gather("xy"),
        counts=torch.from_numpy(counts.copy()).to(device),
        params=params,
    )


def position_arrays(cyl: CylinderSet) -> tuple[npt.NDArray[np.int64], dict[str, Array]]:
    """One position of padded cylinders as (counts, rows by field): rows ``[0, count)`` of each
    finger are its minutiae; the rest is padding and is dropped."""
    counts = cyl.counts.cpu().numpy().astype(np.int64)
    keep = np.arange(cyl.max_minutiae)[None, :] < counts[:, None]
    arrays = {
        "values": cyl.values.cpu().numpy(),
        "cells": cyl.cell_valid.cpu().numpy(),
        "valid": cyl.valid.cpu().numpy().astype(np.bool_),
        "theta": cyl.theta.cpu().numpy().astype(np.float32),
        "xy": cyl.xy.cpu().numpy().astype(np.float32),
    }
    return counts, {field: np.ascontiguousarray(a[keep]) for field, a in arrays.items()}


class RowsBuffer:
    """Growing :class:`CylinderRows` in host memory: appends write only the new subjects' rows
    into arrays that grow by doubling (amortised O(1) per subject), and :meth:`view` gives the
    rows so far, which later appends never change (a grown array is a new one)."""

    def __init__(self, params: MccParams) -> None:
        if not params.binary:
            raise ValueError("the row layout holds bit-packed cylinders only")
        self.params = params
        self.size = 0
        self._present = np.zeros((0, 10), dtype=np.bool_)
        self._counts = [np.zeros(0, dtype=np.int64) for _ in range(10)]
        self._offsets = [np.zeros(0, dtype=np.int64) for _ in range(10)]
        self._used = [0] * 10
        shapes = field_shapes(params)
        self._arrays = [{f: np.zeros((0, *s), dtype=d) for f, (s, d) in shapes.items()} for _ in range(10)]

    def append(self, cylinders: TenPrintCylinders) -> None:
        """Writes these subjects after the rows held."""
        if not cylinders.params.same_cylinders(self.params):
            raise ValueError("cylinders were encoded with other cylinder parameters than the buffer's")
        n, k = self.size, len(cylinders)
        self._present = _room(self._present, n, k)
        self._present[n : n + k] = cylinders.present.cpu().numpy()
        for f, cyl in enumerate(cylinders.fingers):
            counts, arrays = position_arrays(cyl)
            used, rows = self._used[f], int(counts.sum())
            self._counts[f] = _room(self._counts[f], n, k)
            self._offsets[f] = _room(self._offsets[f], n, k)
            self._counts[f][n : n + k] = counts
            self._offsets[f][n : n + k] = used + np.concatenate([[0], np.cumsum(counts)[:-1]])
            for field, rows_in in arrays.items():
                held = self._arrays[f][field] = _room(self._arrays[f][field], used, rows)
                held[used : used + rows] = rows_in
            self._used[f] = used + rows
        self.size = n + k

    def view(self) -> CylinderRows:
        """The subjects appended so far."""
        n = self.size
        positions = tuple(
            PositionRows(
                self._counts[f][:n],
                self._offsets[f][:n],
                {field: a[: self._used[f]] for field, a in self._arrays[f].items()},
            )
            for f in range(10)
        )
        return CylinderRows(self.params, self._present[:n], positions)

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated, including rows not yet used."""
        total = self._present.nbytes
        for f in range(10):
            total += self._counts[f].nbytes + self._offsets[f].nbytes
            total += sum(a.nbytes for a in self._arrays[f].values())
        return total


def _room(array: Array, used: int, extra: int) -> Array:
    """``array`` if it has room for ``extra`` rows after ``used``, else a copy twice as large."""
    if used + extra <= len(array):
        return array
    grown = np.zeros((max(used + extra, 2 * len(array), 16), *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown
