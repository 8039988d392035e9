"""The searchable gallery of a node: every enrolled subject's ten-print as MCC
cylinders on the node's torch device, behind one ``search(probes, k)`` call.

Two tiers (see :mod:`gpu_kernels.shortlist`): small galleries are scored exhaustively with full
MCC; from ``ShortlistConfig.min_gallery`` subjects on, a faiss index over a 1,920-byte code per
subject votes ``candidates`` subjects per probe and full MCC scores only those.

Rows live in buffers that grow by doubling (:class:`_Buffers`): an enrolment writes only its own
rows (amortised O(1) per subject) and swaps in a new snapshot, a view of the first rows, so a
search running in the batcher's thread always sees one consistent gallery. Removals and
re-enrolments rebuild the buffers without the subjects they drop. The shortlist index of a
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
from gpu_kernels.cylinders import CylinderSet
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


@dataclass(frozen=True)
class MemoryUse:
    """Bytes one part of a gallery holds in one place, measured on its live tensors."""

    #: ``cylinders`` (the full MCC tier), ``shortlist_descriptors`` (the host copy the shortlist
    #: index is built from) or ``shortlist_index`` (faiss codes and the whitening tables).
    part: str
    #: Where the tensors live: a torch device, ``cpu`` being host memory.
    location: str
    #: Bytes of the enrolled subjects' rows (and of fixed-size tables).
    bytes: int
    #: Bytes allocated, including buffer rows not yet used by enrolments.
    reserved_bytes: int

    @property
    def on_host(self) -> bool:
        return self.location == "cpu"


@dataclass(frozen=True)
class GalleryMemory:
    """What a gallery of ``subjects`` holds, by part and place."""

    subjects: int
    parts: tuple[MemoryUse, ...]

    @property
    def device_bytes(self) -> int:
        """Bytes in accelerator memory (0 on a CPU node)."""
        return sum(p.bytes for p in self.parts if not p.on_host)

    @property
    def host_bytes(self) -> int:
        return sum(p.bytes for p in self.parts if p.on_host)

    @property
    def device_reserved_bytes(self) -> int:
        return sum(p.reserved_bytes for p in self.parts if not p.on_host)

    @property
    def host_reserved_bytes(self) -> int:
        return sum(p.reserved_bytes for p in self.parts if p.on_host)


@dataclass
class _Snapshot:
    """The gallery as one search sees it: rows ``[0, size)`` of the gallery's buffers.

    ``ids`` and ``rows`` may be shared with later snapshots of the same buffers, which only ever
    append: a row at or past ``size`` (or an id mapped to one) is not in this snapshot.
    """

    ids: list[str]
    rows: dict[str, int]
    size: int
    cylinders: TenPrintCylinders | None
    #: Shortlist descriptors ``float32 [S, 10, D]`` on the host, when the tier is enabled.
    descriptors: Tensor | None = None
    #: Built lazily by :meth:`Gallery._index`; a snapshot never changes, so neither does it.
    index: ShortlistIndex | None = field(default=None, compare=False)

    def row_of(self, subject_id: str) -> int | None:
        row = self.rows.get(subject_id)
        return row if row is not None and row < self.size else None


class _Buffers:
    """Gallery rows in tensors that grow by doubling, so that an enrolment writes only its own
    rows: amortised O(1) per subject instead of a copy of the whole gallery.

    Rows ``[0, size)`` are enrolled subjects; the rest are zeros (what padding holds) waiting for
    the next enrolments. A row below ``size`` is never written again while these buffers are the
    gallery's: a removal or a re-enrolment builds new buffers (O(gallery), rare), so every
    snapshot, a view of the first rows, stays as it was while a search reads it. Each finger
    position keeps its own M (padded cylinders per finger), grown exactly to the largest finger
    enrolled; that reallocates only when a finger brings more minutiae than any before, which
    the template format bounds (255), so it too is O(1) amortised.
    """

    def __init__(self, params: MccParams, device: torch.device, shortlist: bool) -> None:
        self.params = params
        self.device = device
        self.shortlist = shortlist
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.size = 0
        self.capacity = 0
        self.fingers: list[CylinderSet] = []
        self.present: Tensor | None = None
        self.descriptors: Tensor | None = None

    def snapshot(self) -> _Snapshot:
        if self.size == 0 or self.present is None:
            return _Snapshot([], {}, 0, None)
        view = slice(0, self.size)
        cylinders = TenPrintCylinders(tuple(f.select(view) for f in self.fingers), self.present[view])
        descriptors = None if self.descriptors is None else self.descriptors[view]
        return _Snapshot(self.ids, self.rows, self.size, cylinders, descriptors)

    def append(
        self, subject_ids: Sequence[str], cylinders: TenPrintCylinders, descriptors: Tensor | None
    ) -> None:
        """Writes these subjects (none of them present) into the rows past ``size``."""
        n, k = self.size, len(subject_ids)
        cylinders = cylinders.to(self.device)
        if self.present is None and self._adopt(cylinders, descriptors):
            self.ids.extend(subject_ids)
            self.rows.update((s, i) for i, s in enumerate(subject_ids))
            self.size = self.capacity = k
            return
        if self.present is None or n + k > self.capacity:
            self._grow(max(n + k, 2 * self.capacity, 16), cylinders, descriptors)
        for f, part in enumerate(cylinders.fingers):
            if part.max_minutiae > self.fingers[f].max_minutiae:
                self.fingers[f] = _resized(self.fingers[f], self.capacity, part.max_minutiae, n)
            _write(self.fingers[f], part, n)
        assert self.present is not None
        self.present[n : n + k] = cylinders.present
        if self.descriptors is not None and descriptors is not None:
            self.descriptors[n : n + k] = descriptors
        self.ids.extend(subject_ids)
        self.rows.update((s, n + i) for i, s in enumerate(subject_ids))
        self.size = n + k

    def _adopt(self, cylinders: TenPrintCylinders, descriptors: Tensor | None) -> bool:
        """Takes the first enrolment's tensors as the buffers, full (the next append grows them),
        when each owns its memory: loading a large gallery then costs no second copy of it."""
        tensors = [cylinders.present, *(t for f in cylinders.fingers for t in f.tensors)]
        if descriptors is not None:
            tensors.append(descriptors)
        if not all(_owns_storage(t) for t in tensors):
            return False
        self.fingers = list(cylinders.fingers)
        self.present = cylinders.present
        self.descriptors = descriptors if self.shortlist else None
        return True

    def _grow(self, capacity: int, incoming: TenPrintCylinders, descriptors: Tensor | None) -> None:
        if self.present is None:
            self.fingers = [_resized(f, capacity, f.max_minutiae, 0) for f in incoming.fingers]
            self.present = torch.zeros((capacity, 10), dtype=torch.bool, device=self.device)
            if self.shortlist and descriptors is not None:
                self.descriptors = torch.zeros((capacity, *descriptors.shape[1:]), dtype=descriptors.dtype)
        else:
            n = self.size
            self.fingers = [_resized(f, capacity, f.max_minutiae, n) for f in self.fingers]
            self.present = _grown(self.present, capacity, n)
            if self.descriptors is not None:
                self.descriptors = _grown(self.descriptors, capacity, n)
        self.capacity = capacity


def _use(part: str, tensors: Sequence[Tensor]) -> MemoryUse:
    """Bytes of ``tensors``, views of a snapshot's rows, and of the buffers they view."""
    reserved = sum(t.untyped_storage().nbytes() for t in tensors)
    used = sum(t.numel() * t.element_size() for t in tensors)
    return MemoryUse(part, str(tensors[0].device), used, reserved)


def _owns_storage(t: Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _grown(t: Tensor, capacity: int, keep: int) -> Tensor:
    """A zero buffer of ``capacity`` rows, like ``t`` otherwise, holding its first ``keep`` rows."""
    out = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:keep] = t[:keep]
    return out


def _resized(cyl: CylinderSet, capacity: int, m: int, keep: int) -> CylinderSet:
    """A zero buffer of ``capacity`` rows and M = ``m`` holding the first ``keep`` rows of ``cyl``."""

    def empty(t: Tensor) -> Tensor:
        if t.dim() < 2:  # per finger (counts): rows only
            return _grown(t, capacity, keep)
        out = torch.zeros((capacity, m, *t.shape[2:]), dtype=t.dtype, device=t.device)
        out[:keep, : t.shape[1]] = t[:keep]
        return out

    return CylinderSet(
        values=empty(cyl.values),
        cell_valid=empty(cyl.cell_valid),
        valid=empty(cyl.valid),
        theta=empty(cyl.theta),
        xy=empty(cyl.xy),
        counts=empty(cyl.counts),
        params=cyl.params,
    )


def _write(buffer: CylinderSet, part: CylinderSet, row: int) -> None:
    """Copies ``part`` into ``buffer`` from ``row`` on (its M may be smaller: the rest stays zero)."""
    k, m = len(part), part.max_minutiae
    for dst, src in zip(buffer.tensors, part.tensors, strict=True):
        if src.dim() >= 2:
            dst[row : row + k, :m] = src
        else:
            dst[row : row + k] = src


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
        self._buffers = self._new_buffers()
        self._snapshot = self._buffers.snapshot()
        self._write_lock = threading.Lock()
        self._index_lock = threading.Lock()

    def _new_buffers(self) -> _Buffers:
        return _Buffers(self.params, self.device, self.shortlist.enabled)

    def __len__(self) -> int:
        return self._snapshot.size

    @property
    def finger_count(self) -> int:
        cylinders = self._snapshot.cylinders
        return 0 if cylinders is None else int(cylinders.present.sum().item())

    @property
    def nbytes(self) -> int:
        """Bytes of the enrolled subjects' rows: full tier (cylinders) and shortlist descriptors."""
        return sum(m.bytes for m in self.memory().parts if m.part != "shortlist_index")

    def memory(self) -> GalleryMemory:
        """What the gallery holds, measured on the tensors of its current snapshot (views of the
        buffers, which give the bytes allocated), by part and where each lives."""
        snap = self._snapshot
        parts: list[MemoryUse] = []
        if snap.cylinders is not None:
            cyl = snap.cylinders
            parts.append(_use("cylinders", [cyl.present, *(t for f in cyl.fingers for t in f.tensors)]))
        if snap.descriptors is not None:
            parts.append(_use("shortlist_descriptors", [snap.descriptors]))
        if snap.index is not None:
            # faiss codes (host memory: the CPU build; see gpu_kernels.shortlist) and the whitening.
            index = snap.index
            held = index.size * index.bytes_per_subject + sum(
                t.numel() * t.element_size() for t in (index.centre, index.projection)
            )
            parts.append(MemoryUse("shortlist_index", "cpu", held, held))
        return GalleryMemory(snap.size, tuple(parts))

    def contents(self) -> tuple[tuple[str, ...], TenPrintCylinders | None]:
        """Subject ids and their cylinders (rows in the same order), as of one snapshot."""
        snap = self._snapshot
        return tuple(snap.ids[: snap.size]), snap.cylinders

    def encode(self, tenprints: Sequence[TenPrintTemplates]) -> TenPrintCylinders:
        """Cylinders for these ten-prints, on this gallery's device."""
        return encode_tenprints(tenprints, self.params, self.device)

    def _descriptors(self, cylinders: TenPrintCylinders) -> Tensor | None:
        if not self.shortlist.enabled:
            return None
        return subject_descriptors(cylinders).cpu()

    def add(self, subject_ids: Sequence[str], cylinders: TenPrintCylinders) -> None:
        """Adds (or replaces) subjects; ``cylinders`` rows follow ``subject_ids``.

        New subjects are appended in amortised O(1) each; replacing enrolled ones rebuilds the
        gallery without them first (O(gallery)), as a removal does.
        """
        if len(subject_ids) != len(cylinders):
            raise ValueError(f"{len(subject_ids)} subject ids for {len(cylinders)} ten-prints")
        if len(set(subject_ids)) != len(subject_ids):
            raise ValueError("subject ids repeat within one addition")
        descriptors = self._descriptors(cylinders)
        with self._write_lock:
            self._drop(set(subject_ids))
            self._buffers.append(list(subject_ids), cylinders, descriptors)
            self._snapshot = self._buffers.snapshot()

    def remove(self, subject_ids: Sequence[str]) -> int:
        """Removes subjects; returns how many were present."""
        with self._write_lock:
            before = self._snapshot.size
            self._drop(set(subject_ids))
            self._snapshot = self._buffers.snapshot()
            return before - self._snapshot.size

    def _drop(self, drop: set[str]) -> None:
        """New buffers without ``drop`` (caller holds the write lock); the old ones stay with the
        snapshots that searches may still read."""
        snap = self._snapshot
        gone = {s for s in drop if snap.row_of(s) is not None}
        if snap.cylinders is None or not gone:
            return
        keep = [i for i in range(snap.size) if snap.ids[i] not in gone]
        buffers = self._new_buffers()
        if keep:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            descriptors = None if snap.descriptors is None else snap.descriptors[index.cpu()]
            buffers.append([snap.ids[i] for i in keep], snap.cylinders.select(index), descriptors)
        self._buffers = buffers

    def uses_shortlist(self, subjects: int | None = None) -> bool:
        """Whether a search of ``subjects`` (default: the whole gallery) goes through the shortlist."""
        n = len(self) if subjects is None else subjects
        return self.shortlist.enabled and n >= self.shortlist.min_gallery and n > self.shortlist.candidates

    def _index(self, snap: _Snapshot) -> ShortlistIndex:
        with self._index_lock:
            if snap.index is None:
                assert snap.descriptors is not None and snap.cylinders is not None
                snap.index = ShortlistIndex.build(
                    snap.descriptors, snap.cylinders.present, device=snap.cylinders.device
                )
            return snap.index

    def search(
        self, probes: TenPrintCylinders, k: int, subset: Sequence[str] | None = None
    ) -> list[SearchResult]:
        """Top-``k`` candidates per probe, best first.

        ``subset`` restricts the search to those enrolled subject ids (unknown ids are ignored);
        a subset is always scored exhaustively, since it is small by nature.
        """
        snap = self._snapshot
        cylinders, ids = snap.cylinders, snap.ids
        size = snap.size
        if cylinders is not None and subset is not None:
            rows = sorted({r for r in map(snap.row_of, subset) if r is not None})
            ids, size = [snap.ids[r] for r in rows], len(rows)
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            cylinders = cylinders.select(index) if rows else None
        if cylinders is None or not size:
            return [SearchResult([], 0, 0) for _ in range(len(probes))]
        probes = probes.to(self.device)
        if subset is None and snap.descriptors is not None and self.uses_shortlist(size):
            rows_t = self._index(snap).candidates(probes, self.shortlist.candidates)
            scores = score_shortlisted(probes, cylinders, rows_t, self.params)
            candidate_rows = rows_t.to(self.device)  # [P, K] gallery rows behind the score columns
        else:
            scores = score_tenprints(probes, cylinders, self.params)
            candidate_rows = torch.arange(size, device=self.device).expand(len(probes), -1)
        fully_scored = int(scores.fused.shape[1])
        matches = self._top(scores, candidate_rows, cylinders, ids, k)
        return [SearchResult(m, size, fully_scored) for m in matches]

    @staticmethod
    def _top(
        scores: TenPrintScores,
        candidate_rows: Tensor,
        cylinders: TenPrintCylinders,
        ids: Sequence[str],
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
