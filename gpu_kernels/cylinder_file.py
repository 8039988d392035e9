"""The full tier of a large gallery on disk: every subject's packed cylinders, memory-mapped.

A national gallery does not fit in device memory as cylinders (about 8 KB per finger), and
re-encoding it from templates at every start-up costs hours. Encoded once, the cylinders are
written here in a compact row layout and opened again with ``numpy.memmap``: start-up maps the
files instead of reading them, and a search touches only the pages of the subjects its
shortlist names (:meth:`CylinderFile.select`), which the operating system caches.

Layout of a directory (one set of files per finger position ``f`` = 1..10, little-endian):

- ``meta.json``: format version, MCC parameters, subject count, per-position row counts.
- ``present.bin``: ``bool [S, 10]``.
- ``fNN.counts.bin``: ``int64 [S]`` minutiae of subject s at position f (0 when absent).
- ``fNN.values.bin`` ``uint8 [R, C/8]``, ``fNN.cells.bin`` ``uint8 [R, Ns·Ns/8]``,
  ``fNN.valid.bin`` ``bool [R]``, ``fNN.theta.bin`` ``float32 [R]``, ``fNN.xy.bin``
  ``float32 [R, 2]``: one row per minutia, subjects one after another with no padding (R is the
  total minutiae at that position), so the file is not inflated to the largest finger.

Only the bit-based variant is stored; float cylinders are 32 times larger and are for study.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from gpu_kernels.cylinder_rows import FIELDS, CylinderRows, PositionRows, field_shapes, position_arrays
from gpu_kernels.fusion import TenPrintCylinders
from gpu_kernels.params import MccParams

#: Bumped whenever the layout above changes; a reader refuses other versions.
FORMAT_VERSION = 1


class CylinderFileError(ValueError):
    """The directory is not a cylinder file this code can read, or does not fit the request."""


def _name(position: int, field: str) -> str:
    return f"f{position:02d}.{field}.bin"


class CylinderFileWriter:
    """Appends encoded subjects to a new cylinder file; use as a context manager.

    ``append`` takes :class:`TenPrintCylinders` chunks in subject order; ``close`` writes
    ``meta.json`` last, so a directory without it is an interrupted write and is refused.
    """

    def __init__(self, directory: Path, params: MccParams) -> None:
        if not params.binary:
            raise CylinderFileError("only bit-based cylinders are stored")
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "meta.json").exists():
            raise CylinderFileError(f"{directory} already holds a cylinder file")
        self.directory = directory
        self.params = params
        self.subjects = 0
        self.rows = [0] * 10
        self._files: dict[str, BinaryIO] = {"present": (directory / "present.bin").open("wb")}
        for f in range(1, 11):
            for field in (*FIELDS, "counts"):
                self._files[_name(f, field)] = (directory / _name(f, field)).open("wb")

    def append(self, cylinders: TenPrintCylinders) -> None:
        """Writes the subjects of ``cylinders`` after those already written."""
        if not cylinders.params.same_cylinders(self.params):
            raise CylinderFileError("cylinders were encoded with other parameters than the file's")
        self._files["present"].write(cylinders.present.cpu().numpy().astype(np.bool_).tobytes())
        for f, cyl in enumerate(cylinders.fingers, start=1):
            counts, arrays = position_arrays(cyl)
            for field, array in arrays.items():
                self._files[_name(f, field)].write(array.tobytes())
            self._files[_name(f, "counts")].write(counts.tobytes())
            self.rows[f - 1] += int(counts.sum())
        self.subjects += len(cylinders)

    def close(self) -> None:
        """Flushes the files and writes ``meta.json``."""
        for handle in self._files.values():
            handle.close()
        meta = {
            "format_version": FORMAT_VERSION,
            "params": dataclasses.asdict(self.params),
            "subjects": self.subjects,
            "rows": self.rows,
        }
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            # An interrupted write leaves no meta.json, so nobody mistakes it for a gallery.
            for handle in self._files.values():
                handle.close()


class CylinderFile:
    """A memory-mapped cylinder file; :meth:`select` gathers subjects as :class:`TenPrintCylinders`."""

    def __init__(self, directory: Path) -> None:
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise CylinderFileError(
                f"{directory}: no meta.json (not a cylinder file, or an interrupted write)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CylinderFileError(
                f"{directory}: format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
            )
        self.directory = directory
        self.params = MccParams(**meta["params"])
        self.subjects = int(meta["subjects"])
        shapes = field_shapes(self.params)
        present = np.fromfile(directory / "present.bin", dtype=np.bool_)
        if present.size != self.subjects * 10:
            raise CylinderFileError(
                f"{directory}: present.bin holds {present.size} flags for {self.subjects} subjects"
            )
        self.present = torch.from_numpy(present.reshape(self.subjects, 10))
        positions: list[PositionRows] = []
        for f in range(1, 11):
            counts = np.fromfile(directory / _name(f, "counts"), dtype=np.int64)
            rows = int(meta["rows"][f - 1])
            if counts.size != self.subjects or int(counts.sum()) != rows:
                raise CylinderFileError(f"{directory}: counts of position {f} do not match meta.json")
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            arrays: dict[str, np.ndarray[Any, Any]] = {}
            for field, (row_shape, dtype) in shapes.items():
                shape = (rows, *row_shape)
                path = directory / _name(f, field)
                expected = int(np.prod(shape)) * dtype.itemsize
                if path.stat().st_size != expected:
                    raise CylinderFileError(f"{path}: {path.stat().st_size} bytes, expected {expected}")
                # A zero-length file cannot be mapped; an empty position gets an empty array.
                arrays[field] = (
                    np.memmap(path, dtype=dtype, mode="r", shape=shape)
                    if rows
                    else np.zeros(shape, dtype=dtype)
                )
            positions.append(PositionRows(counts, offsets, arrays))
        #: The subjects' rows, memory-mapped: what a gallery searches.
        self.rows = CylinderRows(self.params, present.reshape(self.subjects, 10), tuple(positions))

    def __len__(self) -> int:
        return self.subjects

    @property
    def nbytes(self) -> int:
        """Bytes of the files (what the full tier costs on disk and, when cached, in host memory)."""
        return sum(p.stat().st_size for p in self.directory.glob("*.bin"))

    def select(
        self,
        subjects: Tensor | npt.NDArray[np.int64],
        device: torch.device | str = "cpu",
        params: MccParams | None = None,
    ) -> TenPrintCylinders:
        """The cylinders of ``subjects`` on ``device`` (:meth:`CylinderRows.select`); reads only
        those subjects' rows."""
        try:
            return self.rows.select(subjects, device, params)
        except ValueError as error:
            raise CylinderFileError(f"{self.directory}: {error}") from error
