"""Files only the service's own user may read: data directories (0700), SQLite databases (0600)
and key files.

A service creates its data directory, its databases and the keys it makes itself private, and
tightens those it owns that an earlier version left open. It refuses to start on a key file that
others may read (:func:`require_private_key`); the rule is PostgreSQL's for its server key: a key
owned by the service's user must be 0600 or tighter, one owned by root (when the service runs as
another user) may also be readable by its group (a Kubernetes Secret mounted with an ``fsGroup``
is root's and group-readable, 0440), and none may be readable by the world.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import structlog
from sqlalchemy.engine import URL, make_url

log = structlog.get_logger(__name__)

#: Permission bits no one but the owner may hold on a private file or directory.
_OTHERS = stat.S_IRWXG | stat.S_IRWXO


class ExposedKeyFile(PermissionError):
    """A key file others may read: the service refuses to start with it."""


def private_directory(path: Path) -> Path:
    """Creates ``path`` (and missing parents) readable by its owner only; an existing directory
    this user owns is made so too, unless it is a shared one (sticky or world-writable, like
    /tmp), which is left as it is. Returns ``path``."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for created in missing:  # mkdir's mode yields to the umask, and parents get the default
        with contextlib.suppress(OSError):
            created.chmod(0o700)
    info = path.stat()
    if not info.st_mode & (stat.S_ISVTX | stat.S_IWOTH):
        _tighten(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Creates ``path`` empty, 0600, unless it exists (and the missing folders above it, 0700);
    an existing file this user owns is made 0600 too. Returns ``path``."""
    if not path.parent.exists():  # an existing folder is the service's to make private, not this
        private_directory(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    _tighten(path, 0o600)
    return path


def private_sqlite(url: str | URL) -> None:
    """For a SQLite file URL: the database file (and its WAL and shared-memory files, which SQLite
    creates with the database's own mode) 0600 in a 0700 directory, before SQLite opens it. Other
    URLs (PostgreSQL, in memory) are left alone."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:"):  # a URI filename: SQLite parses it, not this
        return
    path = Path(database)
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            _tighten(companion, 0o600)


def _tighten(path: Path, mode: int) -> None:
    """Takes group and world permissions off ``path`` if this user owns it and they are set."""
    with contextlib.suppress(FileNotFoundError):
        info = path.stat()
        if info.st_uid == os.geteuid() and info.st_mode & _OTHERS:
            path.chmod(mode)
            log.info("made private", path=str(path), mode=oct(mode), was=oct(stat.S_IMODE(info.st_mode)))


def require_private_key(path: Path, what: str) -> None:
    """Raises :class:`ExposedKeyFile` when others may read the key file at ``path``: any world
    permission, or group permissions on a key root does not own (see the module's docstring).
    ``what`` names the key in the message."""
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    world = mode & stat.S_IRWXO
    group = mode & stat.S_IRWXG
    # Root's key, read through the group by a service running as another user (a Secret under
    # an fsGroup); a service running as root holds its key alone like any other.
    root_group_read = info.st_uid == 0 != os.geteuid() and not group & ~stat.S_IRGRP
    if world or (group and not root_group_read):
        raise ExposedKeyFile(
            f"{path}: the {what} may be read by others (mode {mode:04o}); a key must be readable by "
            f"its owner only: run `chmod 600 {path}` (or mount it from a Secret with defaultMode 0400)"
        )


__all__ = ["ExposedKeyFile", "private_directory", "private_file", "private_sqlite", "require_private_key"]
