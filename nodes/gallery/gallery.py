"""The searchable gallery of a node: every enrolled subject's ten-print as MCC cylinders,
behind one ``search(probes, k)`` call.

Where the tiers live (see :mod:`gpu_kernels.shortlist`): the full tier, every subject's
cylinders, stays in host memory in the row layout (:mod:`gpu_kernels.cylinder_rows`: one row per
minutia, no padding, about half of a padded gallery), the node's cache memory-mapped when it
started from one; the scoring device receives only what a search scores. Small galleries are
scored exhaustively with full MCC, a chunk of subjects at a time; from
``ShortlistConfig.min_gallery`` subjects on, a faiss index over a 1,920-byte code per subject
votes ``candidates`` subjects per probe and only those are gathered onto the device and scored.

Appended rows live in host arrays that grow by doubling (:class:`_Buffers`): an enrolment
writes only its own rows (amortised O(1) per subject) and swaps in a new snapshot, so a search
running in the batcher's thread always sees one consistent gallery. Removals and re-enrolments
rebuild the rows without the subjects they drop, in host arrays. The shortlist index of a
snapshot is built by the first search that needs it, not on every enrolment, because enrolment
streams arrive in many small pieces while searches want the whole gallery.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from gpu_kernels import MccParams, TenPrintCylinders, encode_tenprints, score_tenprints
from gpu_kernels.cylinder_rows import CylinderRows, RowsBuffer
from gpu_kernels.fusion import TenPrintScores
from gpu_kernels.shortlist import ShortlistIndex, enrolment_descriptors, score_shortlisted
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
    #: Per finger position present on both sides: its log-likelihood ratio, the term the fused
    #: score sums (empty under a fusion without such terms).
    finger_llr: dict[int, float] = field(default_factory=dict)


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


class FullTier:
    """Rows ``[0, size)`` of a gallery in the row layout (:mod:`gpu_kernels.cylinder_rows`), on
    the host: a memory-mapped base (the node's cache, mapped at start-up) when there is one, then
    the rows appended since, in host arrays. Immutable: later enrolments make a new one."""

    def __init__(self, segments: Sequence[CylinderRows]) -> None:
        self.segments = tuple(s for s in segments if len(s))
        self._starts = np.cumsum([0, *(len(s) for s in self.segments)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def present(self) -> Tensor:
        """``bool [S, 10]``: which fingers each subject has."""
        return torch.from_numpy(
            np.concatenate([s.present for s in self.segments] or [np.zeros((0, 10), bool)])
        )

    def counts(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Minutiae per finger of ``rows``, ``int64 [n, 10]``."""
        out = np.zeros((len(rows), 10), dtype=np.int64)
        for segment, (mask, local) in self._split(rows):
            out[mask] = segment.counts(local)
        return out

    def select(
        self, rows: Tensor | npt.NDArray[np.int64], device: torch.device, params: MccParams
    ) -> TenPrintCylinders:
        """The cylinders of ``rows`` (any order, repeats allowed), padded, on ``device``."""
        rows = np.asarray(rows.cpu().numpy() if isinstance(rows, Tensor) else rows, dtype=np.int64)
        parts = self._split(rows)
        if len(parts) == 1:
            segment, (_, local) = parts[0]
            return segment.select(local, device, params)
        taken = TenPrintCylinders.cat(
            [segment.select(local, device, params) for segment, (_, local) in parts]
        )
        # Back to the order asked for: the parts hold the rows of each segment in turn.
        order = np.concatenate([np.flatnonzero(mask) for _, (mask, _) in parts])
        return taken.select(torch.from_numpy(np.argsort(order, kind="stable")).to(device))

    def chunks(self, size: int, device: torch.device, params: MccParams) -> Iterator[TenPrintCylinders]:
        """Every subject in row order, ``size`` at a time, padded, on ``device``."""
        for lo in range(0, len(self), size):
            yield self.select(np.arange(lo, min(lo + size, len(self))), device, params)

    def _split(
        self, rows: npt.NDArray[np.int64]
    ) -> list[tuple[CylinderRows, tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]]]:
        """Per segment holding some of ``rows``: (segment, (where in ``rows``, rows in it))."""
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"gallery rows must lie in [0, {len(self)})")
        if len(self.segments) == 1:
            return [(self.segments[0], (np.ones(len(rows), dtype=bool), rows))]
        parts = []
        for segment, lo, hi in zip(self.segments, self._starts[:-1], self._starts[1:], strict=True):
            mask = (rows >= lo) & (rows < hi)
            if mask.any():
                parts.append((segment, (mask, rows[mask] - lo)))
        return parts


@dataclass
class _Snapshot:
    """The gallery as one search sees it: rows ``[0, size)`` of the gallery's buffers.

    ``ids`` and ``rows`` may be shared with later snapshots of the same buffers, which only ever
    append: a row at or past ``size`` (or an id mapped to one) is not in this snapshot.
    """

    ids: list[str]
    rows: dict[str, int]
    size: int
    full: FullTier | None
    #: Shortlist descriptors ``float32 [S, 10, D]`` on the host, when the tier is enabled.
    descriptors: Tensor | None = None
    #: Built lazily by :meth:`Gallery._index`; a snapshot never changes, so neither does it.
    index: ShortlistIndex | None = field(default=None, compare=False)

    def row_of(self, subject_id: str) -> int | None:
        row = self.rows.get(subject_id)
        return row if row is not None and row < self.size else None


class _Buffers:
    """A gallery's rows: an optional memory-mapped base, then host arrays that grow by doubling
    (:class:`~gpu_kernels.cylinder_rows.RowsBuffer`), so that an enrolment writes only its own
    rows: amortised O(1) per subject instead of a copy of the whole gallery.

    A row below ``size`` is never written again while these buffers are the gallery's: a removal
    or a re-enrolment builds new buffers (O(gallery), rare), so every snapshot stays as it was
    while a search reads it.
    """

    def __init__(self, params: MccParams, shortlist: bool, base: CylinderRows | None = None) -> None:
        self.params = params
        self.shortlist = shortlist
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.size = 0
        self.base = base
        self.tail = RowsBuffer(params)
        self.descriptors: Tensor | None = None

    def snapshot(self) -> _Snapshot:
        if self.size == 0:
            return _Snapshot([], {}, 0, None)
        segments = [self.tail.view()] if self.base is None else [self.base, self.tail.view()]
        descriptors = None if self.descriptors is None else self.descriptors[: self.size]
        return _Snapshot(self.ids, self.rows, self.size, FullTier(segments), descriptors)

    def adopt_base(self, subject_ids: Sequence[str], descriptors: Tensor | None) -> None:
        """Takes the mapped ``base`` (rows follow ``subject_ids``) as the first rows."""
        assert self.base is not None and self.size == 0 and len(self.base) == len(subject_ids)
        self._extend(subject_ids, descriptors)

    def append(
        self, subject_ids: Sequence[str], cylinders: TenPrintCylinders, descriptors: Tensor | None
    ) -> None:
        """Writes these subjects (none of them present) into the rows past ``size``."""
        self.tail.append(cylinders)
        self._extend(subject_ids, descriptors)

    def _extend(self, subject_ids: Sequence[str], descriptors: Tensor | None) -> None:
        n, k = self.size, len(subject_ids)
        if self.shortlist and descriptors is not None:
            if self.descriptors is None and n == 0 and _owns_storage(descriptors):
                # The first rows' descriptors become the buffer as they are: a gallery loaded at
                # start-up is not copied twice; the next append doubles it.
                self.descriptors = descriptors
            else:
                if self.descriptors is None:
                    self.descriptors = torch.zeros((0, *descriptors.shape[1:]), dtype=descriptors.dtype)
                if n + k > len(self.descriptors):
                    self.descriptors = _grown(self.descriptors, max(n + k, 2 * len(self.descriptors), 16), n)
                self.descriptors[n : n + k] = descriptors
        self.ids.extend(subject_ids)
        self.rows.update((s, n + i) for i, s in enumerate(subject_ids))
        self.size = n + k


def _owns_storage(t: Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _grown(t: Tensor, capacity: int, keep: int) -> Tensor:
    """A zero buffer of ``capacity`` rows, like ``t`` otherwise, holding its first ``keep`` rows."""
    out = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:keep] = t[:keep]
    return out


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Gallery:
    """Enrolled ten-prints as cylinders; thread-safe for one writer and many searches.

    The full tier stays in host memory (:class:`FullTier`), whatever the scoring ``device``: a
    search copies to the device only what it scores, the shortlisted candidates of its batch or,
    for a gallery searched exhaustively, the gallery a chunk at a time.
    """

    def __init__(
        self,
        device: torch.device,
        params: MccParams | None = None,
        shortlist: ShortlistConfig | None = None,
    ) -> None:
        self.device = device
        self.params = params or MccParams()
        if not self.params.binary:
            raise ValueError("a gallery keeps bit-packed cylinders (MccParams.binary)")
        self.shortlist = shortlist or ShortlistConfig()
        self._buffers = self._new_buffers()
        self._snapshot = self._buffers.snapshot()
        self._write_lock = threading.Lock()
        self._index_lock = threading.Lock()

    def _new_buffers(self, base: CylinderRows | None = None) -> _Buffers:
        return _Buffers(self.params, self.shortlist.enabled, base)

    def __len__(self) -> int:
        return self._snapshot.size

    @property
    def finger_count(self) -> int:
        full = self._snapshot.full
        return 0 if full is None else int(full.present().sum().item())

    @property
    def nbytes(self) -> int:
        """Bytes of the enrolled subjects' rows: full tier (cylinders) and shortlist descriptors."""
        return sum(m.bytes for m in self.memory().parts if m.part != "shortlist_index")

    def memory(self) -> GalleryMemory:
        """What the gallery holds, measured on its current snapshot, by part and where each
        lives. ``cylinders_mapped`` is the node's cache file, mapped: host memory as far as the
        operating system keeps its pages."""
        snap, buffers = self._snapshot, self._buffers
        parts: list[MemoryUse] = []
        if snap.full is not None:
            mapped = (
                buffers.base if buffers.base is not None and snap.full.segments[0] is buffers.base else None
            )
            if mapped is not None:
                parts.append(MemoryUse("cylinders_mapped", "cpu", mapped.nbytes, mapped.nbytes))
            held = snap.full.nbytes - (0 if mapped is None else mapped.nbytes)
            parts.append(MemoryUse("cylinders", "cpu", held, max(held, buffers.tail.reserved_bytes)))
        if snap.descriptors is not None:
            descriptors = snap.descriptors
            parts.append(
                MemoryUse(
                    "shortlist_descriptors",
                    "cpu",
                    descriptors.numel() * descriptors.element_size(),
                    descriptors.untyped_storage().nbytes(),
                )
            )
        if snap.index is not None:
            # faiss codes (host memory with the CPU build of faiss) and the whitening tables.
            index = snap.index
            held_index = index.size * index.bytes_per_subject + sum(
                t.numel() * t.element_size() for t in (index.centre, index.projection)
            )
            parts.append(MemoryUse("shortlist_index", index.searched_on, held_index, held_index))
        return GalleryMemory(snap.size, tuple(parts))

    def contents(self) -> tuple[tuple[str, ...], TenPrintCylinders | None]:
        """Subject ids and their cylinders (rows in the same order, padded, on the host), as of
        one snapshot. Materialises the whole gallery: for small galleries and inspection; the
        cache is written from :meth:`full_tier` a chunk at a time."""
        snap = self._snapshot
        ids = tuple(snap.ids[: snap.size])
        if snap.full is None:
            return ids, None
        return ids, snap.full.select(np.arange(snap.size), torch.device("cpu"), self.params)

    def full_tier(self) -> tuple[tuple[str, ...], FullTier | None, Tensor | None]:
        """Subject ids, their full tier and their shortlist descriptors (if kept), as of one snapshot."""
        snap = self._snapshot
        return tuple(snap.ids[: snap.size]), snap.full, snap.descriptors

    def encode(self, tenprints: Sequence[TenPrintTemplates]) -> TenPrintCylinders:
        """Cylinders for these ten-prints, on this gallery's device."""
        return encode_tenprints(tenprints, self.params, self.device)

    def _descriptors(self, cylinders: TenPrintCylinders) -> Tensor | None:
        if not self.shortlist.enabled:
            return None
        return enrolment_descriptors(cylinders).cpu()

    def load_mapped(self, subject_ids: Sequence[str], rows: CylinderRows, descriptors: Tensor | None) -> None:
        """Starts an empty gallery from encoded rows kept elsewhere (the node's memory-mapped
        cache), without copying them; ``descriptors`` are theirs, or None to compute them."""
        if len(subject_ids) != len(rows):
            raise ValueError(f"{len(subject_ids)} subject ids for {len(rows)} ten-prints")
        if not rows.params.same_cylinders(self.params):
            raise ValueError("the rows were encoded with other cylinder parameters than the gallery's")
        if self.shortlist.enabled and descriptors is None:
            full = FullTier([rows])
            descriptors = torch.cat(
                [enrolment_descriptors(c) for c in full.chunks(_CHUNK, torch.device("cpu"), self.params)]
            )
        with self._write_lock:
            if self._snapshot.size:
                raise ValueError("load_mapped starts an empty gallery")
            buffers = self._new_buffers(rows)
            buffers.adopt_base(list(subject_ids), descriptors)
            self._buffers = buffers
            self._snapshot = buffers.snapshot()

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
        """New buffers without ``drop`` (caller holds the write lock), all in host arrays; the old
        ones stay with the snapshots that searches may still read."""
        snap = self._snapshot
        gone = {s for s in drop if snap.row_of(s) is not None}
        if snap.full is None or not gone:
            return
        keep = np.array([i for i in range(snap.size) if snap.ids[i] not in gone], dtype=np.int64)
        buffers = self._new_buffers()
        cpu = torch.device("cpu")
        for lo in range(0, len(keep), _CHUNK):
            rows = keep[lo : lo + _CHUNK]
            descriptors = None if snap.descriptors is None else snap.descriptors[torch.from_numpy(rows)]
            buffers.append([snap.ids[i] for i in rows], snap.full.select(rows, cpu, self.params), descriptors)
        self._buffers = buffers

    def uses_shortlist(self, subjects: int | None = None) -> bool:
        """Whether a search of ``subjects`` (default: the whole gallery) goes through the shortlist."""
        n = len(self) if subjects is None else subjects
        return self.shortlist.enabled and n >= self.shortlist.min_gallery and n > self.shortlist.candidates

    def _index(self, snap: _Snapshot) -> ShortlistIndex:
        with self._index_lock:
            if snap.index is None:
                assert snap.descriptors is not None and snap.full is not None
                snap.index = ShortlistIndex.build(snap.descriptors, snap.full.present(), device=self.device)
            return snap.index

    def search(
        self, probes: TenPrintCylinders, k: int, subset: Sequence[str] | None = None
    ) -> list[SearchResult]:
        """Top-``k`` candidates per probe, best first.

        ``subset`` restricts the search to those enrolled subject ids (unknown ids are ignored);
        a subset is always scored exhaustively, since it is small by nature.
        """
        snap = self._snapshot
        full, ids, size = snap.full, snap.ids, snap.size
        if full is None or not size or not len(probes):
            return [SearchResult([], 0, 0) for _ in range(len(probes))]
        probes = probes.to(self.device)
        if subset is not None:
            rows = np.array(sorted({r for r in map(snap.row_of, subset) if r is not None}), dtype=np.int64)
            if not rows.size:
                return [SearchResult([], 0, 0) for _ in range(len(probes))]
            scores = score_tenprints(probes, full.select(rows, self.device, self.params), self.params)
            candidate_rows = torch.from_numpy(rows).to(self.device).expand(len(probes), -1)
            size = len(rows)
        elif snap.descriptors is not None and self.uses_shortlist(size):
            candidate_rows = self._index(snap).candidates(probes, self.shortlist.candidates).to(self.device)
            scores = self._score_shortlists(probes, full, candidate_rows)
        else:
            scores = _cat_scores(
                [
                    score_tenprints(probes, part, self.params)
                    for part in full.chunks(_CHUNK, self.device, self.params)
                ],
                dim=1,
            )
            candidate_rows = torch.arange(size, device=self.device).expand(len(probes), -1)
        fully_scored = int(scores.fused.shape[1])
        matches = self._top(scores, candidate_rows, full, ids, k)
        return [SearchResult(m, size, fully_scored) for m in matches]

    def _score_shortlists(self, probes: TenPrintCylinders, full: FullTier, rows: Tensor) -> TenPrintScores:
        """Full MCC of each probe against its own shortlist ``rows: [P, K]``: the candidates of
        as many probes as make about ``_CHUNK`` subjects are gathered onto the device at once and
        scored in one batched pass (:func:`~gpu_kernels.shortlist.score_shortlisted`)."""
        k = rows.shape[1]
        step = max(1, _CHUNK // k)
        parts = []
        for lo in range(0, len(probes), step):
            chunk = rows[lo : lo + step]
            n = len(chunk)
            candidates = full.select(chunk.reshape(-1), self.device, self.params)
            local = torch.arange(n * k, device=self.device).reshape(n, k)
            parts.append(score_shortlisted(probes.select(slice(lo, lo + n)), candidates, local, self.params))
        return _cat_scores(parts, dim=0)

    @staticmethod
    def _top(
        scores: TenPrintScores,
        candidate_rows: Tensor,
        full: FullTier,
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
        llr = None if scores.finger_llr is None else torch.gather(scores.finger_llr, 1, fingers).cpu()
        # Minutiae per enrolled finger of the returned candidates: [P, k, 10].
        fused, rows_cpu = top.values.cpu(), rows.cpu()
        counts = full.counts(rows_cpu.reshape(-1).numpy()).reshape(*rows_cpu.shape, 10)
        return [
            [
                Match(
                    subject_id=ids[int(rows_cpu[p, j])],
                    fused=float(fused[p, j]),
                    finger_scores={
                        f + 1: float(per_finger[p, j, f]) for f in range(10) if bool(both[p, j, f])
                    },
                    candidate_minutiae={f + 1: int(counts[p, j, f]) for f in range(10)},
                    finger_llr={}
                    if llr is None
                    else {f + 1: float(llr[p, j, f]) for f in range(10) if bool(both[p, j, f])},
                )
                for j in range(rows_cpu.shape[1])
            ]
            for p in range(rows_cpu.shape[0])
        ]


#: Subjects gathered onto the scoring device at a time (about 350 MB padded at 170 KB each).
_CHUNK = 2048


def _cat_scores(parts: Sequence[TenPrintScores], dim: int) -> TenPrintScores:
    """Scores of probe chunks (``dim=0``) or of gallery chunks (``dim=1``) as one."""
    if len(parts) == 1:
        return parts[0]
    return TenPrintScores(
        per_finger=torch.cat([p.per_finger for p in parts], dim=dim),
        both_present=torch.cat([p.both_present for p in parts], dim=dim),
        fused=torch.cat([p.fused for p in parts], dim=dim),
        probe_counts=parts[0].probe_counts if dim == 1 else torch.cat([p.probe_counts for p in parts]),
        candidate_counts=torch.cat([p.candidate_counts for p in parts], dim=dim),
        finger_llr=None
        if any(p.finger_llr is None for p in parts)
        else torch.cat([p.finger_llr for p in parts if p.finger_llr is not None], dim=dim),
    )
