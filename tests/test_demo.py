"""`fedprint demo` as operators run it past one machine: every node a router in front of shard
processes, every store in PostgreSQL (a throwaway server), every decision checked against the
generator's ground truth, and the demo's databases gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text


def test_the_demo_decides_right_with_sharded_nodes_on_postgresql(
    postgres_server: str, tmp_path: Path
) -> None:
    summary = tmp_path / "demo.json"
    demo = subprocess.run(
        [
            *(sys.executable, "-m", "cli", "demo"),
            *("--persons", "60", "--bookings", "8", "--seed", "7"),
            *("--shards", "2", "--database", postgres_server, "--json", str(summary)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = json.loads(summary.read_text())
    assert (out["shards"], out["database"]) == (2, "postgresql")
    # The 8 bookings, the demo's one-finger booking, its naturalized citizen's three fingers and
    # three fingers of someone with a criminal history.
    assert (out["bookings"], out["correct"], out["wrong"], out["incomplete"]) == (11, 11, 0, 0)
    # The citizen's match goes to an examiner, who confirms it; the policy suppresses the notice.
    assert out["confirmed_and_suppressed"] >= 1
    # The borderline IAFIS match goes to an examiner too; confirmed, its convictions count.
    assert out["iafis_reviews_confirmed"] >= 1
    assert out["iafis_hits"] and out["ident_hits"]
    engine = create_engine(postgres_server)
    with engine.connect() as connection:
        left = connection.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'fedprint_demo%'"))
        assert left.all() == []
    engine.dispose()
