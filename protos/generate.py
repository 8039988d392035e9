"""Regenerates the Python stubs under fedprint/ from the .proto sources beside this file.

Run as ``python protos/generate.py`` (``make proto``). ``--check`` generates into a
temporary directory and exits non-zero when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Writes stubs (and package ``__init__.py`` files) under ``out``; returns them."""
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--mypy_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_grpc_out={out}",
            *sources,
        ],
        check=True,
    )
    written = [p for p in (out / "fedprint").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)]
    package_root = out / "fedprint"
    for directory in {p.parent for p in written}:
        # Package markers for each generated directory below fedprint/ (never above it).
        relative = directory.relative_to(package_root)
        for part in (relative, *relative.parents[:-1]):
            init = package_root / part / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from protos/; do not edit."""\n')
            written.append(init)
    return sorted(set(written))


def committed_stubs(root: Path) -> set[Path]:
    found = {p for p in (root / "fedprint").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}
    return {p.relative_to(root) for p in found}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        for stale in committed_stubs(REPO_ROOT):
            (REPO_ROOT / stale).unlink()
        generate(REPO_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = {p.relative_to(fresh_root) for p in (fresh_root / "fedprint").rglob("*") if p.is_file()}
        stale = sorted(
            str(rel)
            for rel in fresh | {p for p in committed_stubs(REPO_ROOT)}
            if not (REPO_ROOT / rel).is_file()
            or not (fresh_root / rel).is_file()
            or not filecmp.cmp(REPO_ROOT / rel, fresh_root / rel, shallow=False)
        )
    if stale:
        print("stale generated stubs (run `make proto`):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
