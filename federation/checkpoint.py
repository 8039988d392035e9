"""Signed checkpoints of the audit log, kept where the coordinator's database has no say.

A chain can be cut at its end, head and all, and still verify: what is left is a shorter, intact
log. So the coordinator regularly writes the log's length and last MAC, signed with the audit key,
to a file in a directory of its own (mount it from another volume than the database's), and
``fedprint audit verify --checkpoint DIR`` checks that the log still holds at least that many
entries and that the entry at that place is the one the checkpoint saw.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from federation.audit import ChainBreak

#: The file in the checkpoint directory; replaced whole (write and rename) at every checkpoint.
CHECKPOINT_FILE = "audit-checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint file that is not one the audit key signed."""


@dataclass(frozen=True)
class Checkpoint:
    """The audit log as it stood at ``written_at``: ``entries`` long, the last one's MAC ``head``."""

    entries: int
    head: str
    written_at: dt.datetime

    def _signed_text(self) -> bytes:
        return f"{self.entries}\n{self.head}\n{self.written_at.isoformat()}".encode()

    def signature(self, key: bytes) -> str:
        return hmac.new(key, self._signed_text(), hashlib.sha256).hexdigest()

    def check(self, entries: int, hash_at: str | None) -> ChainBreak | None:
        """Whether a log of ``entries`` entries, whose entry number :attr:`entries` has MAC
        ``hash_at`` (None: it has no such entry), is still the one this checkpoint saw."""
        when = self.written_at.isoformat(timespec="seconds")
        if entries < self.entries:
            return ChainBreak(
                entries + 1,
                "",
                f"the log holds {entries} entries, but {self.entries} were checkpointed at {when}: "
                "entries were cut",
            )
        if hash_at != self.head:
            return ChainBreak(
                self.entries,
                "",
                f"entry {self.entries} is not the one checkpointed at {when}: the log was rewritten",
            )
        return None


def write_checkpoint(directory: Path, key: bytes, entries: int, head: str) -> Checkpoint:
    """Signs and writes a checkpoint of a log ``entries`` long ending in ``head``; atomically, so
    a reader sees the previous checkpoint or this one, never half of one."""
    checkpoint = Checkpoint(entries, head, dt.datetime.now(dt.UTC))
    directory.mkdir(parents=True, exist_ok=True)
    body = {
        "entries": entries,
        "head": head,
        "written_at": checkpoint.written_at.isoformat(),
        "signature": checkpoint.signature(key),
    }
    staged = directory / f".{CHECKPOINT_FILE}.tmp"
    staged.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, directory / CHECKPOINT_FILE)
    return checkpoint


def read_checkpoint(directory: Path, key: bytes) -> Checkpoint | None:
    """The latest checkpoint in ``directory``, None when none was written yet. Raises
    :class:`CheckpointError` when the file is not one ``key`` signed."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        checkpoint = Checkpoint(
            int(body["entries"]), str(body["head"]), dt.datetime.fromisoformat(body["written_at"])
        )
        signature = str(body["signature"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not an audit checkpoint: {error}") from None
    if not hmac.compare_digest(signature, checkpoint.signature(key)):
        raise CheckpointError(f"{path} is not signed with this audit key")
    return checkpoint
