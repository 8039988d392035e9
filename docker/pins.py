"""Prints requirement lines from pyproject.toml for the image builds, so the Dockerfiles install
exactly the versions the project pins and name no version of their own.

    python docker/pins.py grpcio-tools mypy-protobuf        # these packages, from any group
    python docker/pins.py --runtime --except faiss-cpu      # every runtime dependency but these

Standard library only: it runs on the bare build image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (``psycopg[binary]==3`` -> psycopg)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(names: list[str], *, runtime: bool, excluded: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    runtime_deps: list[str] = project["dependencies"]
    every = runtime_deps + [r for group in project["optional-dependencies"].values() for r in group]
    if runtime:
        drop = {_name(n) for n in excluded}
        return [r for r in runtime_deps if _name(r) not in drop]
    wanted = {_name(n) for n in names}
    found = [r for r in every if _name(r) in wanted]
    missing = wanted - {_name(r) for r in found}
    if missing:
        raise SystemExit(f"not pinned in {PYPROJECT.name}: {', '.join(sorted(missing))}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="packages to print (with --runtime: to leave out)")
    parser.add_argument("--runtime", action="store_true", help="every runtime dependency")
    parser.add_argument("--except", dest="excluded", nargs="*", default=[], help="with --runtime: leave out")
    args = parser.parse_args()
    excluded = [*args.excluded, *(args.names if args.runtime else [])]
    print("\n".join(requirements(args.names, runtime=args.runtime, excluded=excluded)))


if __name__ == "__main__":
    main()
