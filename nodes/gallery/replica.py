"""A node's in-memory gallery, kept equal to its partition of the store across processes.

Every process that serves a gallery (an unsharded node, each shard, each replica of a shard)
holds its partition in memory and learns what the others write through the store's change
counter (:mod:`nodes.gallery.store`): it remembers the version up to which it has applied every
change (its *watermark*) and, every ``sync_interval_s``, reads the subjects enrolled and removed
above it. Its own enrolments and removals it applies at once.

Changes may reach a process twice or out of order (its own write and the sync that reads it
back, a sync that reads subjects and removals at two moments): each change carries its version,
and a change is applied only when it is newer than what the process holds for that subject and
newer than the watermark. The per-subject versions are kept only above the watermark, so the
bookkeeping stays as small as the changes in flight.

At start-up the gallery comes from the encoded-gallery cache (:mod:`nodes.gallery.cache`) when it
matches the store and the partition, and then catches up on the changes since the cache's
version; otherwise every template of the partition is decoded and encoded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from gpu_kernels import TenPrintCylinders
from minutiae.iso19794_2 import decode_template
from minutiae.template import TenPrintTemplates
from nodes.gallery.cache import read_cache, update_descriptors, write_cache
from nodes.gallery.gallery import TEMPLATE_FORMAT_VERSION, Gallery
from nodes.gallery.partition import Partition
from nodes.gallery.store import Enrollment, GalleryStore, StoredSubject

log = structlog.get_logger(__name__)

#: Subjects decoded and encoded per device call when loading or catching up.
LOAD_CHUNK = 512
#: Subjects padded at a time while the cache is written.
_CACHE_CHUNK = 1024


@dataclass(frozen=True)
class LoadedGallery:
    """How a process's gallery was loaded at start-up."""

    subjects: int
    #: The store version every change up to which the gallery holds.
    version: int
    #: Mapped from the encoded-gallery cache rather than encoded from the stored templates.
    from_cache: bool
    #: Changes (enrolled or removed subjects) applied on top of the cache to catch up.
    caught_up: int = 0


@dataclass(frozen=True)
class Synced:
    """What one catch-up with the store changed."""

    added: int
    removed: int
    version: int


class GalleryReplica:
    """The in-memory gallery of ``partition`` of ``store``, and what keeps it current."""

    def __init__(
        self,
        store: GalleryStore[Any],
        gallery: Gallery,
        partition: Partition,
        cache: Path | None = None,
    ) -> None:
        self.store = store
        self.gallery = gallery
        self.partition = partition
        self.cache = cache
        #: Every change up to this store version is in the gallery.
        self.version = 0
        # Subject -> version of the last change applied to it, for changes above the watermark.
        self._applied: dict[str, int] = {}
        self._lock = threading.Lock()
        # This process's writes: the store and then the gallery, one write at a time.
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._cache_version: int | None = None

    # -- start-up -----------------------------------------------------------------------------

    def load(self) -> LoadedGallery:
        """Fills the gallery: from the cache and the changes since, or from every stored template."""
        state = self.store.state()
        if self.cache is not None:
            cached = read_cache(
                self.cache,
                token=state.token,
                version=state.version,
                partition=self.partition,
                format_version=TEMPLATE_FORMAT_VERSION,
                params=self.gallery.params,
            )
            if cached is not None:
                self.gallery.load_mapped(cached.subject_ids, cached.rows, cached.descriptors)
                recomputed = self.gallery.full_tier()[2]
                if cached.descriptors is None and recomputed is not None:
                    update_descriptors(self.cache, recomputed)
                self.version = self._cache_version = cached.version
                synced = self.sync()
                return LoadedGallery(len(self.gallery), self.version, True, synced.added + synced.removed)
        # The version before the templates: what is read may be newer, never older, and the
        # next sync applies the newer changes again, which changes nothing.
        for chunk in _chunks(self.store.templates(self.partition)):
            self.gallery.add([s.subject_id for s in chunk], self._encode(chunk))
        self.version = state.version
        if self.cache is not None and len(self.gallery):
            self.save_cache()
        return LoadedGallery(len(self.gallery), self.version, False)

    def save_cache(self) -> bool:
        """Writes the gallery to the cache when it is newer than the cache; returns whether it did."""
        if self.cache is None:
            return False
        with self._lock:
            ids, full, descriptors = self.gallery.full_tier()
            version = self.version
        if full is None or version == self._cache_version:
            return False
        params = self.gallery.params
        write_cache(
            self.cache,
            token=self.store.state().token,
            version=version,
            partition=self.partition,
            format_version=TEMPLATE_FORMAT_VERSION,
            subject_ids=list(ids),
            chunks=full.chunks(_CACHE_CHUNK, torch.device("cpu"), params),
            params=params,
            descriptors=descriptors,
        )
        self._cache_version = version
        return True

    # -- this process's own writes ------------------------------------------------------------

    def enroll(self, enrollments: Sequence[Enrollment[Any]], cylinders: TenPrintCylinders) -> int:
        """Stores ``enrollments`` (``cylinders`` rows follow them) and applies them to the gallery
        under one lock, so this process's writes reach its gallery in the order of their store
        versions; returns the version. Blocks on the database: call it off the event loop."""
        with self._write_lock:
            version = self.store.enroll(enrollments)
            self.enrolled([e.subject_id for e in enrollments], cylinders, version)
            return version

    def remove(self, subject_ids: Sequence[str]) -> int:
        """Removes these subjects from the store and the gallery under the same lock as
        :meth:`enroll`; returns how many the store held. Blocks: call it off the event loop."""
        with self._write_lock:
            removed, version = self.store.remove(subject_ids)
            self.removed(subject_ids, version)
            return removed

    def enrolled(self, subject_ids: Sequence[str], cylinders: TenPrintCylinders, version: int) -> None:
        """Applies this process's enrolment, stored as ``version``."""
        with self._lock:
            rows = [i for i, s in enumerate(subject_ids) if self._newer(s, version)]
            if rows:
                picked = cylinders.select(torch.tensor(rows, dtype=torch.long, device=cylinders.device))
                self.gallery.add([subject_ids[i] for i in rows], picked)
                self._applied.update((subject_ids[i], version) for i in rows)

    def removed(self, subject_ids: Iterable[str], version: int) -> None:
        """Applies this process's removal, stored as ``version``."""
        with self._lock:
            drop = [s for s in subject_ids if self._newer(s, version)]
            self.gallery.remove(drop)
            self._applied.update((s, version) for s in drop)

    def _newer(self, subject_id: str, version: int) -> bool:
        # Caller holds the lock.
        return version > self.version and version > self._applied.get(subject_id, 0)

    # -- the other processes' writes ----------------------------------------------------------

    def sync(self) -> Synced:
        """Applies what other processes enrolled in or removed from this partition since the
        watermark, then moves the watermark to the version read first."""
        with self._sync_lock:
            target = self.store.state().version
            since = self.version
            if target <= since:
                return Synced(0, 0, since)
            added = removed = 0
            for chunk in _chunks(self.store.templates(self.partition, since)):
                # Skip what this process already holds (its own writes) before paying for encoding.
                with self._lock:
                    fresh = [s for s in chunk if self._newer(s.subject_id, s.version)]
                if not fresh:
                    continue
                cylinders = self._encode(fresh)
                with self._lock:
                    rows = [i for i, s in enumerate(fresh) if self._newer(s.subject_id, s.version)]
                    if rows:
                        index = torch.tensor(rows, dtype=torch.long, device=cylinders.device)
                        self.gallery.add([fresh[i].subject_id for i in rows], cylinders.select(index))
                        self._applied.update((fresh[i].subject_id, fresh[i].version) for i in rows)
                        added += len(rows)
            # Read outside the lock: this process's own writes (on the event loop) wait for the
            # lock, never for the database.
            removals = self.store.removals(self.partition, since)
            with self._lock:
                gone = [r for r in removals if self._newer(r.subject_id, r.version)]
                removed = self.gallery.remove([r.subject_id for r in gone])
                self._applied.update((r.subject_id, r.version) for r in gone)
                self.version = max(self.version, target)
                self._applied = {s: v for s, v in self._applied.items() if v > self.version}
            if added or gone:
                log.info(
                    "gallery caught up",
                    partition=str(self.partition),
                    added=added,
                    removed=removed,
                    version=self.version,
                    gallery_size=len(self.gallery),
                )
            return Synced(added, len(gone), self.version)

    def _encode(self, subjects: Sequence[StoredSubject]) -> TenPrintCylinders:
        tenprints = [
            TenPrintTemplates({p: decode_template(data) for p, (_, data) in s.templates.items()})
            for s in subjects
        ]
        return self.gallery.encode(tenprints)


def _chunks(subjects: Iterable[StoredSubject]) -> Iterable[list[StoredSubject]]:
    chunk: list[StoredSubject] = []
    for subject in subjects:
        chunk.append(subject)
        if len(chunk) >= LOAD_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
