"""A throwaway PostgreSQL server for the tests that need one: its own cluster in a temporary
directory, on a free port of 127.0.0.1, stopped and deleted at the end of the session.

Uses the Debian server binaries (`.ci/run` installs the `postgresql` package when absent);
where they are missing the tests that need PostgreSQL are skipped, except in CI (``CI`` set),
where they fail. initdb refuses to run as
root, so as root the cluster belongs to the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Names a directory holding initdb and pg_ctl, where they are not under /usr/lib/postgresql
#: (another distribution's layout, a build of one's own).
BINDIR_VARIABLE = "FEDPRINT_POSTGRES_BINDIR"


def server_binaries() -> Path | None:
    """The PostgreSQL server's bin directory: the one :data:`BINDIR_VARIABLE` names, else the
    newest Debian one; None when it holds no initdb."""
    if named := os.environ.get(BINDIR_VARIABLE):
        return Path(named) if (Path(named) / "initdb").exists() else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_postgres(bindir: Path) -> Iterator[str]:
    """Starts a cluster and yields a SQLAlchemy URL of its ``postgres`` database."""
    root = Path(tempfile.mkdtemp(prefix="fedprint-pg-"))
    user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*args: str) -> None:
        subprocess.run([*user, *args], check=True, capture_output=True, cwd=root)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
