"""The coordinator's audit log as a keyed hash chain.

Every entry holds the MAC of the entry before it, and its own MAC covers its sequence number,
time, TCN, event, detail and payload together with that previous MAC. A one-row head table
holds the number of entries and the last MAC. Editing, deleting, reordering or truncating
entries therefore breaks the chain at a place :func:`verify_chain` names, on every database
backend (the append-only triggers refuse such edits too; the chain also catches the edits made
around them, e.g. with the triggers dropped or the file edited by hand).

The MAC is HMAC-SHA-256 under the coordinator's audit key, which lives outside the database
(like the booking key): whoever can write the database but not read the key cannot re-chain an
edited log. Without a key (a store opened for tests or tools that only read) the chain is plain
SHA-256, which catches edits but not a rewrite of the whole chain. What the chain cannot catch
alone, cutting its end together with the head, a signed checkpoint kept elsewhere does
(:mod:`federation.checkpoint`).

Entries that change a stored decision or a notice carry a state record as payload
(:func:`state_record`): the digests of the decision and of the notice as they stand after the
change, so that verification also finds a decision edited or a notice dropped behind the log's
back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass

#: The previous hash of the first entry.
GENESIS = "0" * 64


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; everything stored here is UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def entry_hash(
    prev_hash: str,
    seq: int,
    recorded_at: dt.datetime,
    tcn: str,
    event: str,
    detail: str,
    payload: bytes,
    key: bytes | None = None,
) -> str:
    """HMAC-SHA-256 under ``key`` (plain SHA-256 without one) of an entry, its fields
    length-prefixed so that no two entries encode alike."""
    micros = round(_aware(recorded_at).timestamp() * 1_000_000)
    digest = hmac.new(key, digestmod=hashlib.sha256) if key else hashlib.sha256()
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


#: Payloads that start so are state records (:func:`state_record`).
STATE_PREFIX = b"state\n"


def content_digest(content: bytes | None) -> str:
    """SHA-256 of a stored row's content, ``none`` for a row that is not there."""
    return "none" if content is None else hashlib.sha256(content).hexdigest()


def state_record(decision: bytes | None, notice: bytes | None) -> bytes:
    """The payload of an entry that changed a TCN's stored decision or notice: their digests
    after the change (``notice``: the notification, pending or dead-lettered)."""
    return STATE_PREFIX + f"decision={content_digest(decision)}\nnotice={content_digest(notice)}\n".encode()


def parse_state(payload: bytes) -> tuple[str, str] | None:
    """(decision digest, notice digest) of a state record; None for another payload."""
    if not payload.startswith(STATE_PREFIX):
        return None
    fields = dict(line.split("=", 1) for line in payload[len(STATE_PREFIX) :].decode().splitlines())
    return fields["decision"], fields["notice"]


def verify_chain(
    entries: Iterable[AuditEntry], head_entries: int, head_hash: str, key: bytes | None = None
) -> ChainBreak | None:
    """Checks entries (in sequence order) against each other and the head, under ``key``;
    None when intact."""
    expected_prev, expected_seq = GENESIS, 1
    last_seq, last_tcn = 0, ""
    for e in entries:
        if e.seq != expected_seq:
            return ChainBreak(e.seq, e.tcn, f"entry {expected_seq} is missing (found {e.seq} in its place)")
        if e.prev_hash != expected_prev:
            return ChainBreak(e.seq, e.tcn, "does not follow the entry before it (previous hash differs)")
        recomputed = entry_hash(e.prev_hash, e.seq, e.recorded_at, e.tcn, e.event, e.detail, e.payload, key)
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
