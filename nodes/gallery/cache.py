"""The node's cache of its encoded gallery, so that a restart maps cylinders instead of
re-encoding every stored template (hours of CPU at national scale).

The cache is a :mod:`gpu_kernels.cylinder_file` directory plus ``state.json`` (the store's token,
the store version the cache reflects, the partition, the template format version) and
``subjects.txt`` (gallery rows in order). It is used only when it is of this store, this
partition and this code, and not ahead of the store: the node then maps it and catches up with
the changes written since its version (:mod:`nodes.gallery.replica`). A cache that does not match
is ignored and rewritten, so it can make start-up faster but never make the gallery wrong. Writes
go to a sibling directory that is renamed into place, so a crash mid-write leaves the old cache
or none.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from gpu_kernels import MccParams, TenPrintCylinders
from gpu_kernels.cylinder_file import CylinderFile, CylinderFileError, CylinderFileWriter
from gpu_kernels.cylinder_rows import CylinderRows
from gpu_kernels.shortlist import DESCRIPTOR_VERSION
from nodes.gallery.partition import Partition

log = structlog.get_logger(__name__)

_STATE = "state.json"
_SUBJECTS = "subjects.txt"
_DESCRIPTORS = "descriptors.npy"


@dataclass(frozen=True)
class CachedGallery:
    """What a valid cache holds: subject ids and their cylinders (memory-mapped), rows in the
    same order, as of store version ``version``; and their shortlist descriptors when the cache
    has them for this code's descriptor version."""

    subject_ids: list[str]
    rows: CylinderRows
    version: int
    descriptors: torch.Tensor | None


def read_cache(
    directory: Path,
    *,
    token: str,
    version: int,
    partition: Partition,
    format_version: int,
    params: MccParams,
) -> CachedGallery | None:
    """The cached gallery if it is of the store ``token``, of ``partition``, of ``format_version``
    and ``params``, and not ahead of the store's ``version``."""
    try:
        state = json.loads((directory / _STATE).read_text())
        if (
            state.get("store_token") != token
            or state.get("template_format_version") != format_version
            or state.get("partition") != [partition.index, partition.count]
            or not isinstance(state.get("store_version"), int)
            or state["store_version"] > version
        ):
            return None
        cylinders_file = CylinderFile(directory)
        ids = (directory / _SUBJECTS).read_text().splitlines()
    except (OSError, ValueError, CylinderFileError) as error:
        if (directory / _STATE).exists():
            log.warning("gallery cache unreadable; re-encoding", directory=str(directory), error=str(error))
        return None
    if not cylinders_file.params.same_cylinders(params) or len(ids) != len(cylinders_file):
        return None
    if not ids:
        return None
    return CachedGallery(
        ids, cylinders_file.rows, int(state["store_version"]), _descriptors(directory, state, len(ids))
    )


def _descriptors(directory: Path, state: dict[str, object], subjects: int) -> torch.Tensor | None:
    """The cached shortlist descriptors, if they are of this code's version and these subjects."""
    path = directory / _DESCRIPTORS
    if state.get("descriptor_version") != DESCRIPTOR_VERSION or not path.exists():
        return None
    try:
        descriptors = np.load(path)
    except (OSError, ValueError) as error:
        log.warning("cached descriptors unreadable; recomputing", directory=str(directory), error=str(error))
        return None
    if descriptors.ndim != 3 or descriptors.shape[:2] != (subjects, 10) or descriptors.dtype != np.float32:
        return None
    return torch.from_numpy(descriptors)


def write_cache(
    directory: Path,
    *,
    token: str,
    version: int,
    partition: Partition,
    format_version: int,
    subject_ids: list[str],
    chunks: Iterable[TenPrintCylinders],
    params: MccParams,
    descriptors: torch.Tensor | None = None,
) -> None:
    """Replaces the cache at ``directory`` with these subjects (``partition`` of the store ``token``
    as of its ``version``), atomically. ``chunks`` are their cylinders in row order, a chunk at a
    time (a large gallery is never padded whole); ``descriptors`` their shortlist descriptors."""
    staging = directory.with_name(directory.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    written = 0
    with CylinderFileWriter(staging, params) as writer:
        for chunk in chunks:
            writer.append(chunk)
            written += len(chunk)
    if written != len(subject_ids):
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"{written} ten-prints written for {len(subject_ids)} subject ids")
    (staging / _SUBJECTS).write_text("".join(f"{s}\n" for s in subject_ids))
    state: dict[str, object] = {
        "store_token": token,
        "store_version": version,
        "partition": [partition.index, partition.count],
        "template_format_version": format_version,
        "subjects": len(subject_ids),
    }
    if descriptors is not None:
        np.save(staging / _DESCRIPTORS, descriptors.numpy().astype(np.float32, copy=False))
        state["descriptor_version"] = DESCRIPTOR_VERSION
    (staging / _STATE).write_text(json.dumps(state) + "\n")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def update_descriptors(directory: Path, descriptors: torch.Tensor) -> None:
    """Stores shortlist descriptors recomputed for a cache whose own were of another descriptor
    version, so that the next start-up reads them instead of computing them again. Each file is
    replaced by a rename: a crash leaves the old descriptors (ignored, as before) or the new."""
    state = json.loads((directory / _STATE).read_text())
    if descriptors.shape[0] != state.get("subjects"):
        raise ValueError(
            f"{descriptors.shape[0]} descriptors for a cache of {state.get('subjects')} subjects"
        )
    staged = directory / (_DESCRIPTORS + ".writing")
    with staged.open("wb") as handle:
        np.save(handle, descriptors.numpy().astype(np.float32, copy=False))
    staged.replace(directory / _DESCRIPTORS)
    state["descriptor_version"] = DESCRIPTOR_VERSION
    staged_state = directory / (_STATE + ".writing")
    staged_state.write_text(json.dumps(state) + "\n")
    staged_state.replace(directory / _STATE)
