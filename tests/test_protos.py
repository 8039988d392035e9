"""The committed gRPC stubs are exactly what `make proto` generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_proto_package_is_versioned() -> None:
    for proto in (ROOT / "protos").rglob("*.proto"):
        package = next(line for line in proto.read_text().splitlines() if line.startswith("package "))
        assert package.rstrip(";").split(".")[-1] == "v1", proto
