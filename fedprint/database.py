"""Database engines for the stores: SQLite files by default, PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url

from fedprint.private import private_sqlite


def database_url(url: str | URL) -> URL:
    """``url`` with PostgreSQL's driver made explicit: a plain ``postgresql://`` URL means the
    psycopg (3) driver fedprint ships, not SQLAlchemy's default psycopg2, which it does not."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def connect(url: str | URL) -> Engine:
    """An engine for ``url``; SQLite gets WAL and enforced foreign keys, and its file is made
    readable by this user only before it is opened (:func:`fedprint.private.private_sqlite`)."""
    private_sqlite(url)
    engine = create_engine(database_url(url))
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            _use_wal(cursor)
            cursor.close()

    return engine


#: How long a SQLite connection waits for another's lock before failing: the sqlite3 module's
#: default, made explicit because switching to WAL mode (below) waits as long.
_SQLITE_BUSY_MS = 5_000


def _use_wal(cursor: Any) -> None:
    """Puts the SQLite file in WAL mode, which the file keeps. Only the first connection changes
    it; the change needs the file to itself and fails at once, without the busy timeout's wait,
    while another connection is in a transaction (another replica upgrading the schema). So it is
    asked first, and a failed change is retried until another connection has made it or the busy
    timeout has passed. A database that cannot be in WAL mode (in memory) answers with the mode
    it keeps, and stays in it."""
    deadline = time.monotonic() + _SQLITE_BUSY_MS / 1000
    while _journal_mode(cursor) != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _journal_mode(cursor: Any) -> str:
    return str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()


@contextlib.contextmanager
def scratch_databases(server: str, names: Sequence[str], *, keep: bool = False) -> Iterator[dict[str, str]]:
    """Creates an empty PostgreSQL database per name on the server of ``server`` (a URL of any
    database there, used to create the others), yields their URLs by name, and drops them at the
    end unless ``keep``. For the demo and benchmarks: each service gets a database of its own."""
    admin_url = database_url(server)
    if admin_url.get_backend_name() != "postgresql":
        raise ValueError(f"{admin_url.render_as_string()} is not a PostgreSQL URL")
    bad = [n for n in names if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", n)]
    if bad:
        raise ValueError(f"not a plain database name: {', '.join(bad)}")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []
    try:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
                created.append(name)
        yield {n: admin_url.set(database=n).render_as_string(hide_password=False) for n in names}
    finally:
        if not keep:
            with admin.connect() as connection:
                for name in created:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
