"""Which partition of a sharded gallery a subject belongs to.

A node's gallery may be split into ``count`` partitions, each held by one shard process (and its
replicas). Subject ``s`` belongs to partition ``bucket(s) mod count``, where ``bucket`` is a
stable hash of the subject id: the first four bytes of its SHA-256, as a 31-bit integer. Every
process computes the same owner, and the store keeps each subject's bucket in a column, so that a
shard reads its partition with ``WHERE bucket % count = index``.

Partitions are computed, never stored: when ``count`` changes, each shard started with the new
count simply loads the subjects it now owns. Nothing moves between processes. (A stable hash
modulo ``count`` moves most subjects to another partition when ``count`` changes; the shards
re-read them from the shared database either way, so consistent hashing would save nothing.)
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

#: Buckets are 31-bit, so that they fit a signed 32-bit integer column on every database.
BUCKETS = 2**31


def subject_bucket(subject_id: str) -> int:
    """The stable hash of a subject id, in [0, 2**31). It must never change: stored buckets and
    every shard's partition depend on it."""
    digest = hashlib.sha256(subject_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % BUCKETS


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count``; ``Partition(0, 1)`` is the whole gallery."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"no partition {self.index} of {self.count}")

    def owns(self, subject_id: str) -> bool:
        return subject_bucket(subject_id) % self.count == self.index

    @property
    def whole(self) -> bool:
        """Whether this partition is the whole gallery."""
        return self.count == 1

    def __str__(self) -> str:
        return f"partition {self.index} of {self.count}"


WHOLE = Partition(0, 1)


def owner(subject_id: str, count: int) -> int:
    """The index of the partition (of ``count``) that holds ``subject_id``."""
    return subject_bucket(subject_id) % count


def by_owner(subject_ids: Iterable[str], count: int) -> dict[int, list[str]]:
    """Subject ids grouped by the partition that holds them, in the order given."""
    groups: dict[int, list[str]] = defaultdict(list)
    for subject_id in subject_ids:
        groups[owner(subject_id, count)].append(subject_id)
    return dict(groups)
