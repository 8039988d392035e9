"""The suite's own set-up: in CI a database test that cannot run fails rather than passing as a
skip; on a user's machine it is skipped with its reason in the summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import BINDIR_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
ONE_POSTGRES_TEST = (
    "tests/test_stores.py::test_the_ice_store_keeps_one_notification_per_tcn_in_utc[postgresql]"
)


def run_without_postgres(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """One PostgreSQL test in a fresh pytest, with the server binaries hidden (an empty bindir)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[BINDIR_VARIABLE] = str(tmp_path)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ONE_POSTGRES_TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_in_ci_a_missing_postgresql_fails_with_its_reason(tmp_path: Path) -> None:
    result = run_without_postgres(tmp_path, ci="true")
    assert result.returncode != 0, result.stdout
    assert "1 error" in result.stdout
    assert "PostgreSQL server binaries (initdb, pg_ctl) are not installed" in result.stdout
    assert "CI must run the PostgreSQL tests" in result.stdout


@pytest.mark.slow
def test_on_a_users_machine_a_missing_postgresql_is_a_skip_with_its_reason(tmp_path: Path) -> None:
    result = run_without_postgres(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
    assert "SKIPPED" in result.stdout and "PostgreSQL server binaries" in result.stdout
