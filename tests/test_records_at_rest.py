"""Records at rest live only as long as their purpose: an ICE notice leaves the outbox once ICE
acknowledges it, a dead letter's once its retention has passed (each row keeping its TCN, level
and digest); data folders, databases and keys are readable by the service's user only, and a
service does not start on a key file others may read."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import sqlite3
import stat
from pathlib import Path

import grpc
import pytest
import yaml
from alembic import command
from sqlalchemy import create_engine, text

from federation.audit import parse_state
from federation.outbox import OutboxDeliverer
from federation.store import MIGRATIONS as COORDINATOR
from federation.store import CoordinatorStore, DeadLetterPurged
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.pki import TlsFiles
from fedprint.private import ExposedKeyFile
from fedprint.records.v1 import records_pb2 as rec
from ice_service import build_ice
from ice_service.config import IceConfig
from ice_service.server import IceStore
from launcher.services import build_service
from synthetic.population import Population
from tests.conftest import Federation, key
from tests.test_federation_e2e import pick
from tests.waiting import eventually


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def outbox_row(database: Path, tcn: str) -> tuple[bytes, int, str, str | None]:
    """(notification, level, digest, delivered_at) of ``tcn``'s outbox row, read from the file."""
    with sqlite3.connect(database) as connection:
        row = connection.execute(
            "SELECT notification, level, digest, delivered_at FROM outbox WHERE tcn = ?", (tcn,)
        ).fetchone()
    assert row is not None, tcn
    return bytes(row[0]), row[1], row[2], row[3]


async def test_an_acknowledged_notice_leaves_the_outbox_keeping_tcn_level_and_digest(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.notification == bk.QUEUED
    (received,) = await federation.wait_for_notifications(1)
    assert received.notification.ident_match.immigration_history.subject_id == sample.truth.ident_subject_id
    database = federation.root / "coordinator" / "coordinator.sqlite"
    # ICE has it: once the coordinator records the acknowledgement, the notice is gone from its disk.
    notice, level, digest, _ = await eventually(
        lambda: outbox_row(database, key(sample.booking)),
        lambda row: row[3] is not None,
        what="the delivery recorded",
    )
    assert notice == b"" and level == received.notification.level != rec.THREAT_LEVEL_UNSPECIFIED
    # The digest is the one the audit log recorded when the notice was queued.
    with sqlite3.connect(database) as connection:
        (queued,) = connection.execute(
            "SELECT payload FROM audit_log WHERE tcn = ? AND event = 'notification_queued'",
            (key(sample.booking),),
        ).fetchone()
    state = parse_state(bytes(queued))
    assert state is not None and state[1] == digest
    # Nothing of the immigration record is left in the outbox.
    with sqlite3.connect(database) as connection:
        stored = b"".join(bytes(r[0]) for r in connection.execute("SELECT notification FROM outbox"))
    assert sample.truth.ident_subject_id.encode() not in stored
    assert federation.coordinator.coordinator.store.verify_audit()[1] is None


def notice(tcn: str) -> ice.Notification:
    return ice.Notification(
        tcn=tcn,
        ori="XX0010000",
        level=rec.LEVEL_1,
        ident_match={"subject_id": "FIN-1", "immigration_history": {"subject_id": "FIN-1"}},
    )


def queued(store: CoordinatorStore, tcn: str) -> None:
    decision = bk.BookingDecision(tcn=tcn, ori="XX0010000", status=bk.COMPLETE, notification=bk.QUEUED)
    store.record_decision(decision, notice(tcn))


async def test_a_dead_letter_past_its_retention_loses_its_notice(database_url: str, tmp_path: Path) -> None:
    store = CoordinatorStore(database_url)
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # nothing listens: every delivery fails
    try:
        queued(store, "TCN-DEAD-1")
        outbox = OutboxDeliverer(
            store,
            ice_grpc.IceNotificationServiceStub(channel),
            deadline_s=2.0,
            retry_initial_s=0.01,
            retry_max_s=0.01,
            max_attempts=1,
            dead_letter_retention_s=3600.0,
        )
        assert await outbox.deliver_due() == 0
        (entry,) = store.undelivered()
        assert entry.dead and not entry.purged and entry.level == rec.LEVEL_1
        assert store.purge_notices(3600.0) == 0  # within its retention it waits for an operator

        assert store.purge_notices(1e-9) == 1  # past it, the notice goes
        (entry,) = store.undelivered()
        assert entry.dead and entry.purged and entry.level == rec.LEVEL_1
        engine = create_engine(database_url)
        with engine.connect() as connection:
            row = connection.execute(
                text(
                    "SELECT notification, level, digest FROM outbox_dead_letters "
                    "WHERE tcn = 'XX0010000/TCN-DEAD-1'"
                )
            ).one()
        engine.dispose()
        expected = hashlib.sha256(notice("TCN-DEAD-1").SerializeToString()).hexdigest()
        assert (bytes(row[0]), row[1], row[2]) == (b"", rec.LEVEL_1, expected)
        with pytest.raises(DeadLetterPurged):
            store.retry_dead_letter("XX0010000/TCN-DEAD-1", "operator")
        assert [e for e, _ in store.audit("XX0010000/TCN-DEAD-1")][-1] == "notification_purged"
        assert store.verify_audit()[1] is None
    finally:
        await channel.close(None)
        store.close()


def test_notices_from_before_keep_their_level_and_digest_and_delivered_ones_are_purged(
    database_url: str,
) -> None:
    """Revision 0006 gives existing rows their level and digest; the coordinator then purges the
    notices ICE had acknowledged, audited."""
    engine = create_engine(database_url)
    old = notice("TCN-OLD-N")
    with engine.connect() as connection:
        command.upgrade(COORDINATOR.config(connection), "0005")
        connection.execute(
            text(
                "INSERT INTO outbox (tcn, notification, created_at, attempts, next_attempt_at, "
                "delivered_at, last_error) VALUES ('TCN-OLD-N', :n, :t, 1, :t, :t, '')"
            ),
            {"n": old.SerializeToString(), "t": dt.datetime.now(dt.UTC)},
        )
        connection.commit()
    engine.dispose()
    store = CoordinatorStore(database_url)
    try:
        assert store.purge_notices(3600.0) == 1
        engine = create_engine(database_url)
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT notification, level, digest FROM outbox WHERE tcn = 'TCN-OLD-N'")
            ).one()
        engine.dispose()
        digest = hashlib.sha256(old.SerializeToString()).hexdigest()
        assert (bytes(row[0]), row[1], row[2]) == (b"", rec.LEVEL_1, digest)
    finally:
        store.close()


async def test_data_folders_databases_and_keys_are_private(federation: Federation) -> None:
    for service in ("coordinator", "iafis", "ident", "ice"):
        folder = federation.root / service
        assert mode(folder) == 0o700, service
        databases = [p for p in folder.iterdir() if ".sqlite" in p.name]
        assert databases, service
        for database in databases:  # the database and its WAL and shared-memory files
            assert mode(database) == 0o600, database
    for secret in ("booking.key", "audit.key"):
        assert mode(federation.root / "coordinator" / secret) == 0o600


async def test_a_data_folder_and_database_left_open_are_made_private(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    database = folder / "ice.sqlite"
    IceStore(f"sqlite:///{database}").close()
    folder.chmod(0o755)  # as an earlier version left them
    database.chmod(0o644)
    service = build_ice(IceConfig(data_dir=folder, tls=pki["ice"]))
    await service.stop(0)
    assert (mode(folder), mode(database)) == (0o700, 0o600)
    # A shared folder (sticky, like /tmp) holding a database is left as it is.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    IceStore(f"sqlite:///{shared / 'ice.sqlite'}").close()
    assert mode(shared) == 0o1777 and mode(shared / "ice.sqlite") == 0o600


def coordinator_config(tmp_path: Path, pki: dict[str, TlsFiles], **settings: object) -> Path:
    tls = pki["coordinator"]
    config = {
        "data_dir": str(tmp_path / "coordinator"),
        "iafis_address": "127.0.0.1:1",
        "ident_address": "127.0.0.1:2",
        "ice_address": "127.0.0.1:3",
        "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
        **settings,
    }
    path = tmp_path / "coordinator.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("readable", [0o640, 0o604, 0o644])
async def test_the_coordinator_does_not_start_on_a_booking_key_others_can_read(
    tmp_path: Path, pki: dict[str, TlsFiles], readable: int
) -> None:
    key = tmp_path / "keys" / "booking.key"
    key.parent.mkdir()
    key.write_text("00" * 32 + "\n")
    key.chmod(readable)
    with pytest.raises(ExposedKeyFile) as refused:
        build_service("coordinator", coordinator_config(tmp_path, pki, booking_key_file=str(key)))
    assert str(key) in str(refused.value) and f"chmod 600 {key}" in str(refused.value)


async def test_a_service_does_not_start_on_a_tls_key_others_can_read(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    tls = pki["ice"]
    key = tmp_path / "ice.key"
    shutil.copyfile(tls.key, key)
    key.chmod(0o644)
    config = {
        "data_dir": str(tmp_path / "ice"),
        "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(key)},
    }
    path = tmp_path / "ice.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ExposedKeyFile) as refused:
        build_service("ice", path)
    assert f"chmod 600 {key}" in str(refused.value)
    key.chmod(0o600)
    service = build_service("ice", path)  # the same key, private: it starts
    assert service.host is not None
