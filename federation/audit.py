"""The coordinator's audit log as a hash chain.

Every entry holds the hash of the entry before it, and its own hash covers its sequence
number, time, TCN, event, detail and payload together with that previous hash. A one-row
head table holds the number of entries and the last hash. Editing, deleting, reordering or
truncating entries therefore breaks the chain at a place :func:`verify_chain` names, on every
database backend (the append-only triggers refuse such edits too; the chain also catches the
edits made around them, e.g. with the triggers dropped or the file edited by hand).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

#: The previous hash of the first entry.
GENESIS = "0" * 64


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; everything stored here is UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def entry_hash(
    prev_hash: str, seq: int, recorded_at: dt.datetime, tcn: str, event: str, detail: str, payload: bytes
) -> str:
    """SHA-256 of an entry, its fields length-prefixed so that no two entries encode alike."""
    micros = round(_aware(recorded_at).timestamp() * 1_000_000)
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(prev_hash))
    digest.update(struct.pack(">qq", seq, micros))
    for part in (tcn.encode(), event.encode(), detail.encode(), payload):
        digest.update(struct.pack(">I", len(part)))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    """One stored entry of the log, as :func:`verify_chain` reads it."""

    seq: int
    recorded_at: dt.datetime
    tcn: str
    event: str
    detail: str
    payload: bytes
    prev_hash: str
    entry_hash: str


@dataclass(frozen=True)
class ChainBreak:
    """The first place where the log is not what was written."""

    seq: int
    tcn: str
    reason: str


def verify_chain(entries: Iterable[AuditEntry], head_entries: int, head_hash: str) -> ChainBreak | None:
    """Checks entries (in sequence order) against each other and the head; None when intact."""
    expected_prev, expected_seq = GENESIS, 1
    last_seq, last_tcn = 0, ""
    for e in entries:
        if e.seq != expected_seq:
            return ChainBreak(e.seq, e.tcn, f"entry {expected_seq} is missing (found {e.seq} in its place)")
        if e.prev_hash != expected_prev:
            return ChainBreak(e.seq, e.tcn, "does not follow the entry before it (previous hash differs)")
        recomputed = entry_hash(e.prev_hash, e.seq, e.recorded_at, e.tcn, e.event, e.detail, e.payload)
        if recomputed != e.entry_hash:
            return ChainBreak(e.seq, e.tcn, "its content was changed after it was written (hash differs)")
        expected_prev, expected_seq = e.entry_hash, e.seq + 1
        last_seq, last_tcn = e.seq, e.tcn
    if head_entries != last_seq:
        return ChainBreak(
            last_seq + 1, last_tcn, f"the log ends at entry {last_seq} but {head_entries} were written"
        )
    if head_hash != expected_prev:
        return ChainBreak(last_seq, last_tcn, "the last entry is not the one the head recorded")
    return None
