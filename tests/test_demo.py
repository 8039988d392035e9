"""`fedprint demo` as operators run it past one machine: every node a router in front of shard
processes, every store in PostgreSQL (a throwaway server), every decision checked against the
generator's ground truth, and the demo's databases gone afterwards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.json_format import ParseDict
from sqlalchemy import create_engine, text

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.records.v1 import records_pb2 as rec

#: What would tell a jail about immigration: an IDENT subject id (FIN), an immigration status by
#: its name or in words, a suppression, a pending IDENT review, an examiner's note (the demo's
#: examiner writes these two).
IMMIGRATION_TELLS = (
    re.compile(r"FIN-\d+"),
    re.compile("|".join(rec.ImmigrationStatus.keys()[1:])),
    re.compile(
        r"(?i)\b(citizen\w*|naturali[sz]\w*|immigra\w*|visas?|overstay\w*|asylum|removal|suppress\w*)\b"
    ),
    re.compile(r"IDENT (hit|candidate|match)"),
    re.compile(r"minutiae agree finger by finger|ridge detail differs"),
)


def assert_nothing_of_immigration_reached_an_agency(log: Path, expected: int) -> None:
    """Every decision the agencies received, by any call, rendered whole and searched."""
    lines = log.read_text().splitlines()
    assert len(lines) == expected and expected > 0
    calls = set()
    for line in lines:
        message = json.loads(line)
        calls.add(message["rpc"])
        decision = ParseDict(message["decision"], bk.BookingDecision())
        assert decision.ident.band == bio.DECISION_BAND_UNSPECIFIED and not decision.ident.candidates
        assert not decision.ident.confirmed_subject_id and not decision.ident.error
        assert decision.notification not in (bk.SUPPRESSED, bk.EXAMINER_REVIEW, bk.UNDELIVERABLE)
        assert not decision.agency_reasons  # moved into reasons: the agency has one list
        rendered = text_format.MessageToString(decision)
        for tell in IMMIGRATION_TELLS:
            assert not tell.search(rendered), f"{tell.pattern!r} in what {message['rpc']} gave an agency"
    assert calls == {"SubmitBooking", "GetDecision", "WatchDecisions"}


def test_the_demo_decides_right_with_sharded_nodes_on_postgresql(
    postgres_server: str, tmp_path: Path
) -> None:
    summary, agency_log = tmp_path / "demo.json", tmp_path / "agencies.jsonl"
    demo = subprocess.run(
        [
            *(sys.executable, "-m", "cli", "demo"),
            *("--persons", "60", "--bookings", "8", "--seed", "7"),
            *("--shards", "2", "--database", postgres_server, "--json", str(summary)),
            *("--agency-log", str(agency_log)),
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
    assert_nothing_of_immigration_reached_an_agency(agency_log, out["agency_messages"])
    engine = create_engine(postgres_server)
    with engine.connect() as connection:
        left = connection.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'fedprint_demo%'"))
        assert left.all() == []
    engine.dispose()
