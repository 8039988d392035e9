"""The searchable gallery of a node: every enrolled subject's ten-print as MCC
cylinders on the node's torch device, behind one ``search(probes, k)`` call.

Two tiers (see :mod:`gpu_kernels.shortlist`): small galleries are scored exhaustively with full
MCC; from ``ShortlistConfig.min_gallery`` subjects on, a faiss index over a 1,920-byte code per
subject votes ``candidates`` subjects per probe and full MCC scores only those.

Changes (enroll, remove) build a new immutable snapshot and swap it in, so a search
running in the batcher's thread always sees one consistent gallery. The shortlist index of a
snapshot is built by the first search that needs it, not on every enrolment, because enrolment
streams arrive in many small pieces while searches want the whole gallery.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gpu_kernels import MccParams, TenPrintCylinders, encode_tenprints, score_tenprints
from gpu_kernels.fusion import TenPrintScores
from gpu_kernels.shortlist import ShortlistIndex, score_shortlisted, subject_descriptors
from minutiae.template import TenPrintTemplates
from nodes.gallery.config import ShortlistConfig

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
class SearchResult:
    """The candidates of one probe, best first, and how much of the gallery was searched."""

    matches: list[Match]
    #: Enrolled subjects the probe was compared with (by shortlist code or full MCC).
    searched: int
    #: Subjects scored with full MCC: all searched ones, or the probe's shortlist.
    fully_scored: int


@dataclass
class _Snapshot:
    subject_ids: tuple[str, ...]
    rows: dict[str, int]
    cylinders: TenPrintCylinders | None
    #: Shortlist descriptors ``float32 [S, 10, D]`` on the host, when the tier is enabled.
    descriptors: Tensor | None = None
    #: Built lazily by :meth:`Gallery._index`; a snapshot never changes, so neither does it.
    index: ShortlistIndex | None = field(default=None, compare=False)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Gallery:
    """Enrolled ten-prints as cylinders; thread-safe for one writer and many searches."""

    def __init__(
        self,
        device: torch.device,
        params: MccParams | None = None,
        shortlist: ShortlistConfig | None = None,
    ) -> None:
        self.device = device
        self.params = params or MccParams()
        self.shortlist = shortlist or ShortlistConfig()
        self._snapshot = _Snapshot((), {}, None)
        self._write_lock = threading.Lock()
        self._index_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._snapshot.subject_ids)

    @property
    def finger_count(self) -> int:
        cylinders = self._snapshot.cylinders
        return 0 if cylinders is None else int(cylinders.present.sum().item())

    @property
    def nbytes(self) -> int:
        """Bytes of the full tier (cylinders) and the shortlist descriptors."""
        snap = self._snapshot
        full = 0 if snap.cylinders is None else int(snap.cylinders.nbytes)
        desc = 0 if snap.descriptors is None else snap.descriptors.numel() * snap.descriptors.element_size()
        return full + desc

    def contents(self) -> tuple[tuple[str, ...], TenPrintCylinders | None]:
        """Subject ids and their cylinders (rows in the same order), as of one snapshot."""
        snap = self._snapshot
        return snap.subject_ids, snap.cylinders

    def encode(self, tenprints: Sequence[TenPrintTemplates]) -> TenPrintCylinders:
        """Cylinders for these ten-prints, on this gallery's device."""
        return encode_tenprints(tenprints, self.params, self.device)

    def _descriptors(self, cylinders: TenPrintCylinders) -> Tensor | None:
        if not self.shortlist.enabled:
            return None
        return subject_descriptors(cylinders).cpu()

    def add(self, subject_ids: Sequence[str], cylinders: TenPrintCylinders) -> None:
        """Adds (or replaces) subjects; ``cylinders`` rows follow ``subject_ids``."""
        if len(subject_ids) != len(cylinders):
            raise ValueError(f"{len(subject_ids)} subject ids for {len(cylinders)} ten-prints")
        if len(set(subject_ids)) != len(subject_ids):
            raise ValueError("subject ids repeat within one addition")
        descriptors = self._descriptors(cylinders)
        with self._write_lock:
            kept = self._without(set(subject_ids))
            ids = kept.subject_ids + tuple(subject_ids)
            merged = (
                cylinders if kept.cylinders is None else TenPrintCylinders.cat([kept.cylinders, cylinders])
            )
            if descriptors is not None and kept.descriptors is not None:
                descriptors = torch.cat([kept.descriptors, descriptors])
            self._snapshot = _Snapshot(ids, {s: i for i, s in enumerate(ids)}, merged, descriptors)

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
        descriptors = None if snap.descriptors is None else snap.descriptors[index.cpu()]
        return _Snapshot(ids, {s: i for i, s in enumerate(ids)}, snap.cylinders.select(index), descriptors)

    def uses_shortlist(self, subjects: int | None = None) -> bool:
        """Whether a search of ``subjects`` (default: the whole gallery) goes through the shortlist."""
        n = len(self) if subjects is None else subjects
        return self.shortlist.enabled and n >= self.shortlist.min_gallery and n > self.shortlist.candidates

    def _index(self, snap: _Snapshot) -> ShortlistIndex:
        with self._index_lock:
            if snap.index is None:
                assert snap.descriptors is not None and snap.cylinders is not None
                snap.index = ShortlistIndex.build(snap.descriptors, snap.cylinders.present)
            return snap.index

    def search(
        self, probes: TenPrintCylinders, k: int, subset: Sequence[str] | None = None
    ) -> list[SearchResult]:
        """Top-``k`` candidates per probe, best first.

        ``subset`` restricts the search to those enrolled subject ids (unknown ids are ignored);
        a subset is always scored exhaustively, since it is small by nature.
        """
        snap = self._snapshot
        cylinders, ids = snap.cylinders, snap.subject_ids
        if cylinders is not None and subset is not None:
            rows = sorted({snap.rows[s] for s in subset if s in snap.rows})
            ids = tuple(snap.subject_ids[r] for r in rows)
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            cylinders = cylinders.select(index) if rows else None
        if cylinders is None or not ids:
            return [SearchResult([], 0, 0) for _ in range(len(probes))]
        probes = probes.to(self.device)
        if subset is None and snap.descriptors is not None and self.uses_shortlist(len(ids)):
            rows_t = self._index(snap).candidates(probes, self.shortlist.candidates)
            scores = score_shortlisted(probes, cylinders, rows_t, self.params)
            candidate_rows = rows_t.to(self.device)  # [P, K] gallery rows behind the score columns
        else:
            scores = score_tenprints(probes, cylinders, self.params)
            candidate_rows = torch.arange(len(ids), device=self.device).expand(len(probes), -1)
        fully_scored = int(scores.fused.shape[1])
        matches = self._top(scores, candidate_rows, cylinders, ids, k)
        return [SearchResult(m, len(ids), fully_scored) for m in matches]

    @staticmethod
    def _top(
        scores: TenPrintScores,
        candidate_rows: Tensor,
        cylinders: TenPrintCylinders,
        ids: tuple[str, ...],
        k: int,
    ) -> list[list[Match]]:
        """The ``k`` best columns of ``scores`` per probe as :class:`Match` lists.

        Column ``j`` of probe ``p`` is gallery row ``candidate_rows[p, j]``. Only the top-k rows
        leave the device.
        """
        top = torch.topk(scores.fused, k=min(k, scores.fused.shape[1]), dim=1)
        rows = torch.gather(candidate_rows, 1, top.indices)  # [P, k] gallery rows
        fingers = top.indices.unsqueeze(-1).expand(-1, -1, 10)
        per_finger = torch.gather(scores.per_finger, 1, fingers).cpu()
        both = torch.gather(scores.both_present, 1, fingers).cpu()
        # Minutiae per enrolled finger of the returned candidates: [P, k, 10].
        counts = torch.stack([f.counts[rows] for f in cylinders.fingers], dim=-1).cpu()
        fused, rows_cpu = top.values.cpu(), rows.cpu()
        return [
            [
                Match(
                    subject_id=ids[int(rows_cpu[p, j])],
                    fused=float(fused[p, j]),
                    finger_scores={
                        f + 1: float(per_finger[p, j, f]) for f in range(10) if bool(both[p, j, f])
                    },
                    candidate_minutiae={f + 1: int(counts[p, j, f]) for f in range(10)},
                )
                for j in range(rows_cpu.shape[1])
            ]
            for p in range(rows_cpu.shape[0])
        ]
