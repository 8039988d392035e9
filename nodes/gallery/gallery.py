"""The searchable gallery of a node: every enrolled subject's ten-print as MCC
cylinders on the node's torch device, behind one ``search(probes, k)`` call.

Changes (enroll, remove) build a new immutable snapshot and swap it in, so a search
running in the batcher's thread always sees one consistent gallery.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_kernels import MccParams, TenPrintCylinders, encode_tenprints, score_tenprints
from minutiae.template import TenPrintTemplates

#: Version of the node's in-memory template format (MCC parameters and packing).
#: Stored templates are kept as received, so a new version re-encodes them at start-up.
TEMPLATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Match:
    """One candidate of one probe."""

    subject_id: str
    fused: float
    #: Per finger position 1-10 present on both sides: the MCC score.
    finger_scores: dict[int, float]
    #: Per finger position: minutiae in the enrolled template.
    candidate_minutiae: dict[int, int]


@dataclass(frozen=True)
class _Snapshot:
    subject_ids: tuple[str, ...]
    rows: dict[str, int]
    cylinders: TenPrintCylinders | None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Gallery:
    """Enrolled ten-prints as cylinders; thread-safe for one writer and many searches."""

    def __init__(self, device: torch.device, params: MccParams | None = None) -> None:
        self.device = device
        self.params = params or MccParams()
        self._snapshot = _Snapshot((), {}, None)
        self._write_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._snapshot.subject_ids)

    @property
    def finger_count(self) -> int:
        cylinders = self._snapshot.cylinders
        return 0 if cylinders is None else int(cylinders.present.sum().item())

    @property
    def nbytes(self) -> int:
        cylinders = self._snapshot.cylinders
        return 0 if cylinders is None else int(cylinders.nbytes)

    def encode(self, tenprints: Sequence[TenPrintTemplates]) -> TenPrintCylinders:
        """Cylinders for these ten-prints, on this gallery's device."""
        return encode_tenprints(tenprints, self.params, self.device)

    def add(self, subject_ids: Sequence[str], cylinders: TenPrintCylinders) -> None:
        """Adds (or replaces) subjects; ``cylinders`` rows follow ``subject_ids``."""
        if len(subject_ids) != len(cylinders):
            raise ValueError(f"{len(subject_ids)} subject ids for {len(cylinders)} ten-prints")
        if len(set(subject_ids)) != len(subject_ids):
            raise ValueError("subject ids repeat within one addition")
        with self._write_lock:
            kept = self._without(set(subject_ids))
            ids = kept.subject_ids + tuple(subject_ids)
            merged = (
                cylinders if kept.cylinders is None else TenPrintCylinders.cat([kept.cylinders, cylinders])
            )
            self._snapshot = _Snapshot(ids, {s: i for i, s in enumerate(ids)}, merged)

    def remove(self, subject_ids: Sequence[str]) -> int:
        """Removes subjects; returns how many were present."""
        with self._write_lock:
            before = len(self._snapshot.subject_ids)
            self._snapshot = self._without(set(subject_ids))
            return before - len(self._snapshot.subject_ids)

    def _without(self, drop: set[str]) -> _Snapshot:
        snap = self._snapshot
        if snap.cylinders is None or not drop.intersection(snap.rows):
            return snap
        keep = [i for i, s in enumerate(snap.subject_ids) if s not in drop]
        ids = tuple(snap.subject_ids[i] for i in keep)
        if not keep:
            return _Snapshot((), {}, None)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        return _Snapshot(ids, {s: i for i, s in enumerate(ids)}, snap.cylinders.select(index))

    def search(
        self, probes: TenPrintCylinders, k: int, subset: Sequence[str] | None = None
    ) -> tuple[list[list[Match]], int]:
        """Top-``k`` candidates per probe, best first, and the number of subjects searched.

        ``subset`` restricts the search to those enrolled subject ids (unknown ids are ignored).
        """
        snap = self._snapshot
        cylinders, ids = snap.cylinders, snap.subject_ids
        if cylinders is not None and subset is not None:
            rows = sorted({snap.rows[s] for s in subset if s in snap.rows})
            ids = tuple(snap.subject_ids[r] for r in rows)
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            cylinders = cylinders.select(index) if rows else None
        if cylinders is None or not ids:
            return [[] for _ in range(len(probes))], 0
        scores = score_tenprints(probes.to(self.device), cylinders, self.params)
        top = torch.topk(scores.fused, k=min(k, len(ids)), dim=1)
        fused, rows_t = top.values.cpu(), top.indices.cpu()
        # Only the top-k rows leave the device.
        per_finger = torch.gather(
            scores.per_finger, 1, top.indices.unsqueeze(-1).expand(-1, -1, scores.per_finger.shape[-1])
        ).cpu()
        both = torch.gather(
            scores.both_present, 1, top.indices.unsqueeze(-1).expand(-1, -1, scores.both_present.shape[-1])
        ).cpu()
        # Minutiae per enrolled finger of the returned candidates: [P, k, 10].
        counts = torch.stack([f.counts[top.indices] for f in cylinders.fingers], dim=-1).cpu()
        results: list[list[Match]] = []
        for p in range(len(probes)):
            results.append(
                [
                    Match(
                        subject_id=ids[int(rows_t[p, j])],
                        fused=float(fused[p, j]),
                        finger_scores={
                            f + 1: float(per_finger[p, j, f])
                            for f in range(per_finger.shape[-1])
                            if bool(both[p, j, f])
                        },
                        candidate_minutiae={f + 1: int(counts[p, j, f]) for f in range(counts.shape[-1])},
                    )
                    for j in range(rows_t.shape[1])
                ]
            )
        return results, len(ids)
