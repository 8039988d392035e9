"""Bookings that finish on their own, resubmissions that must repeat themselves, notifications
that end in a dead-letter table rather than retrying forever, and an audit log whose every
edit is found: over real gRPC servers, real SQLite, and a throwaway PostgreSQL (the store tests
run on both)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from calibration.thresholds import Thresholds
from cli.app import app
from federation.audit import GENESIS, entry_hash
from federation.checkpoint import write_checkpoint
from federation.outbox import OutboxDeliverer
from federation.store import CoordinatorStore
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import open_channel
from synthetic.population import Population
from tests.conftest import Federation, key
from tests.test_federation_e2e import pick, with_tcn


async def test_a_booking_left_incomplete_by_a_down_node_becomes_final_without_resubmission(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    stub = federation.booking_stub(sample.booking.ori)
    admin = bk_grpc.BookingServiceStub(federation.channel(federation.address, "admin"))
    watch = stub.WatchDecisions(bk.WatchDecisionsRequest(ori=sample.booking.ori), timeout=60)
    await federation.ident.stop(0)

    decision = await stub.SubmitBooking(sample.booking, timeout=30)
    assert decision.status == bk.INCOMPLETE and decision.ident.outcome == bk.UNAVAILABLE
    store = federation.coordinator.coordinator.store
    assert store.sealed_booking(key(sample.booking)) is not None
    stats = await admin.GetStats(bk.GetStatsRequest(), timeout=5)
    assert stats.incomplete == 1 and stats.retrying_bookings == 1
    # Sealed at rest: no finger template appears in the coordinator's database file.
    template = sample.booking.tenprint.fingers[0].template.data
    database = (federation.root / "coordinator" / "coordinator.sqlite").read_bytes()
    assert template[20:60] not in database

    await federation.restart_node("ident")  # nobody resubmits: the coordinator retries by itself
    final = None
    async for update in watch:
        if update.tcn == sample.booking.tcn and update.status == bk.COMPLETE:
            final = update
            break
    watch.cancel()
    assert final is not None and final.attempt >= 2
    assert final.iafis.outcome == bk.ANSWERED  # kept from the first attempt, not searched again
    assert final.notification == bk.QUEUED
    assert federation.kept(sample.booking).ident.candidates[0].subject_id == sample.truth.ident_subject_id
    assert [n.notification.tcn for n in await federation.wait_for_notifications(1)] == [sample.booking.tcn]
    assert store.sealed_booking(key(sample.booking)) is None  # deleted once final
    stats = await admin.GetStats(bk.GetStatsRequest(), timeout=5)
    assert stats.incomplete == 0 and stats.retrying_bookings == 0


async def test_a_resubmitted_tcn_with_other_charges_is_refused_naming_what_differs(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=True, ident=False)
    stub = federation.booking_stub(sample.booking.ori)
    first = await stub.SubmitBooking(sample.booking, timeout=30)
    assert (await stub.SubmitBooking(sample.booking, timeout=30)) == first  # same booking: same answer

    changed = with_tcn(sample.booking, sample.booking.tcn)
    changed.charges.append(rec.Charge(ncic_code="0999", literal="HOMICIDE"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SubmitBooking(changed, timeout=30)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "charges" in (refused.value.details() or "") and "tenprint" not in (refused.value.details() or "")
    stored = await stub.GetDecision(bk.GetDecisionRequest(tcn=sample.booking.tcn), timeout=5)
    assert stored == first


def notification(tcn: str) -> ice.Notification:
    return ice.Notification(tcn=tcn, ori="XX0010000", level=rec.LEVEL_1)


def decision(tcn: str, state: bk.NotificationState.ValueType = bk.QUEUED) -> bk.BookingDecision:
    return bk.BookingDecision(tcn=tcn, ori="XX0010000", status=bk.COMPLETE, notification=state, attempt=1)


async def test_a_notification_ice_never_takes_becomes_a_dead_letter_an_operator_can_retry(
    database_url: str,
) -> None:
    url = database_url
    store = CoordinatorStore(url)
    store.record_decision(decision("TCN-DEAD-1"), notification("TCN-DEAD-1"))
    # A real channel to a port where nothing listens: every attempt is UNAVAILABLE.
    async with open_channel("127.0.0.1:1", None, insecure=True, retries=False) as channel:
        outbox = OutboxDeliverer(
            store,
            ice_grpc.IceNotificationServiceStub(channel),
            deadline_s=1.0,
            retry_initial_s=0.001,
            retry_max_s=0.002,
            max_attempts=3,
        )
        for _ in range(3):
            await asyncio.sleep(0.01)
            assert await outbox.deliver_due() == 0
    assert store.due_notifications() == []  # no more attempts: it is not retried forever
    stored = store.decision("XX0010000/TCN-DEAD-1")
    assert stored is not None and stored.notification == bk.UNDELIVERABLE
    (entry,) = store.undelivered()
    assert entry.dead and entry.attempts == 3 and entry.last_error.startswith("UNAVAILABLE")
    assert store.stats().dead_letters == 1 and store.stats().outbox_pending == 0
    store.close()

    runner = CliRunner()
    listed = runner.invoke(app, ["outbox", "list", "--db", url, "--json"])
    assert listed.exit_code == 0 and '"state": "dead"' in listed.output
    assert runner.invoke(app, ["outbox", "retry", "TCN-NOPE", "--db", url]).exit_code == 1
    assert runner.invoke(app, ["outbox", "retry", "XX0010000/TCN-DEAD-1", "--db", url]).exit_code == 0

    store = CoordinatorStore(url)
    assert [p.tcn for p in store.due_notifications()] == ["XX0010000/TCN-DEAD-1"]
    stored = store.decision("XX0010000/TCN-DEAD-1")
    assert stored is not None and stored.notification == bk.QUEUED
    events = [event for event, _ in store.audit("XX0010000/TCN-DEAD-1")]
    assert events == [
        "decision",
        "notification_queued",
        "notification_dead_lettered",
        "notification_requeued",
    ]
    stats = store.stats()
    assert stats.outbox_pending == 1 and stats.dead_letters == 0
    assert stats.oldest_pending_notification_age_s >= 0.0
    store.close()


AUDIT_KEY = bytes(range(32))


def filled_store(url: str, key: bytes | None = AUDIT_KEY) -> CoordinatorStore:
    """Five decisions with queued notices (ten entries), one delivery, one event of its own."""
    store = CoordinatorStore(url, audit_key=key)
    for i in range(5):
        store.record_decision(decision(f"TCN-AUDIT-{i}"), notification(f"TCN-AUDIT-{i}"))
    store.mark_delivered("XX0010000/TCN-AUDIT-0", duplicate=False)
    store.record_event("XX0010000/TCN-AUDIT-1", "refused", "example of an entry of its own")
    return store


def test_the_audit_chain_finds_an_edited_entry_and_a_truncated_log(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.sqlite"
    url = f"sqlite:///{path}"
    store = filled_store(url)
    assert store.verify_audit() == (12, None)
    store.close()
    runner = CliRunner()
    key = tmp_path / "audit.key"
    key.write_text(AUDIT_KEY.hex())
    assert runner.invoke(app, ["audit", "verify", "--db", url, "--key", str(key)]).exit_code == 0

    with sqlite3.connect(path) as db:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit_log SET detail = 'nothing happened' WHERE seq = 3")
        # Someone who drops the triggers first can edit; the chain still tells.
        db.execute("DROP TRIGGER audit_log_no_update")
        db.execute("UPDATE audit_log SET detail = 'nothing happened' WHERE seq = 5")
    verified = runner.invoke(app, ["audit", "verify", "--db", url, "--key", str(key)])
    assert verified.exit_code == 1
    assert "entry 5 (TCN XX0010000/TCN-AUDIT-2)" in verified.output and "changed" in verified.output

    truncated = tmp_path / "truncated.sqlite"
    store = filled_store(f"sqlite:///{truncated}")
    store.close()
    with sqlite3.connect(truncated) as db:
        db.execute("DROP TRIGGER audit_log_no_delete")
        db.execute("DELETE FROM audit_log WHERE seq = (SELECT max(seq) FROM audit_log)")
    store = CoordinatorStore(f"sqlite:///{truncated}", audit_key=AUDIT_KEY)
    checked, broken = store.verify_audit()
    store.close()
    assert checked == 11 and broken is not None and broken.seq == 12


def test_the_audit_log_is_append_only_and_chained_on_postgresql(postgres_url: str) -> None:
    store = filled_store(postgres_url)
    assert store.verify_audit() == (12, None)
    store.close()
    engine = create_engine(postgres_url)
    for statement in ("UPDATE audit_log SET detail = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change"))
        connection.execute(text("UPDATE audit_log SET tcn = 'TCN-OTHER' WHERE seq = 2"))
    engine.dispose()
    store = CoordinatorStore(postgres_url, audit_key=AUDIT_KEY)
    checked, broken = store.verify_audit()
    store.close()
    assert checked == 12 and broken is not None and broken.seq == 2


def test_concurrent_writers_never_fork_the_audit_chain(database_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = CoordinatorStore(database_url)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.record_decision(decision(f"TCN-C-{i}"), None), range(40)))
    assert store.verify_audit() == (40, None)
    store.close()


def test_stats_age_counts_from_when_the_notification_was_queued(database_url: str) -> None:
    store = CoordinatorStore(database_url)
    store.record_decision(decision("TCN-AGE-1"), notification("TCN-AGE-1"))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
    store.mark_failed("XX0010000/TCN-AGE-1", "UNAVAILABLE: down", later, max_attempts=10)
    assert store.stats().outbox_pending == 1
    assert 0.0 <= store.stats().oldest_pending_notification_age_s < 30.0
    store.close()


async def test_a_retry_keeps_the_answered_search_with_the_record_that_only_ice_may_see(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    stub = federation.booking_stub(sample.booking.ori)
    await federation.iafis.stop(0)
    first = await stub.SubmitBooking(sample.booking, timeout=30)
    assert first.status == bk.INCOMPLETE and first.ident.outcome == bk.ANSWERED
    assert not first.ident.candidates  # the agency never sees IDENT's candidates
    kept = federation.kept(sample.booking)
    assert kept.ident.candidates[0].WhichOneof("record") is None  # nor does the coordinator keep it

    await federation.restart_node("iafis")
    (received,) = await federation.wait_for_notifications(1)
    # IDENT was not searched again, yet ICE gets the immigration record of the first answer.
    match = received.notification.ident_match
    assert match.subject_id == sample.truth.ident_subject_id
    assert match.immigration_history.subject_id == sample.truth.ident_subject_id
    final = await stub.GetDecision(bk.GetDecisionRequest(tcn=sample.booking.tcn), timeout=5)
    assert final.status == bk.COMPLETE and not final.ident.candidates
    assert federation.kept(sample.booking).ident.candidates[0].WhichOneof("record") is None


async def test_a_one_finger_booking_never_reaches_ice_by_itself_while_the_full_ten_print_does(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    stub = federation.booking_stub(sample.booking.ori)
    one = with_tcn(sample.booking, sample.booking.tcn + "-ONE")
    kept = [f for f in one.tenprint.fingers if f.WhichOneof("data") == "template"][:1]
    del one.tenprint.fingers[:]
    one.tenprint.fingers.extend(kept)

    seen = await stub.SubmitBooking(one, timeout=30)
    assert seen.status == bk.COMPLETE and seen.notification == bk.NOT_REQUIRED
    lone = federation.kept(one)
    assert lone.ident.band != bio.HIT and lone.notification != bk.QUEUED
    if lone.ident.band == bio.REVIEW:  # an examiner decides; the reasons say why
        assert lone.notification == bk.EXAMINER_REVIEW
        assert any("fewer than" in r or "review band" in r for r in lone.reasons)

    full = await stub.SubmitBooking(sample.booking, timeout=30)
    assert full.notification == bk.QUEUED and federation.kept(sample.booking).ident.band == bio.HIT
    assert [n.notification.tcn for n in await federation.wait_for_notifications(1)] == [sample.booking.tcn]


async def test_a_node_with_a_calibration_nobody_pinned_is_not_believed(
    federation: Federation, population: Population
) -> None:
    # IDENT restarted with fixed thresholds that make anyone a hit: its answers are not decisions.
    stranger = pick(population, iafis=False, ident=False)
    await federation.ident.stop(0)
    rogue = Thresholds(hit=-1000.0, review=-2000.0, source="rogue fixed thresholds")
    await federation.restart_node("ident", pin=False, thresholds=rogue)
    decision = await federation.booking_stub(stranger.booking.ori).SubmitBooking(stranger.booking, timeout=30)
    assert decision.status == bk.INCOMPLETE and decision.notification == bk.DEFERRED
    kept = federation.kept(stranger.booking)
    assert decision.ident.outcome == kept.ident.outcome == bk.UNTRUSTED
    assert "another calibration" in kept.ident.error and not kept.ident.candidates
    store = federation.coordinator.coordinator.store
    assert any(event == "node_answer_refused" for event, _ in store.audit(key(stranger.booking)))
    assert store.outbox_attempts(key(stranger.booking)) is None and await federation.notifications() == []
    counted = federation.coordinator.coordinator.untrusted_answers.labels("ident", "calibration")
    assert counted._value.get() >= 1


async def test_a_node_restarted_on_an_empty_gallery_is_not_believed(
    federation: Federation, population: Population, tmp_path: Path
) -> None:
    # Same calibration, but no one enrolled: its NO_HIT would be a silent miss of a true mate.
    sample = pick(population, iafis=False, ident=True, notify=True)
    await federation.ident.stop(0)
    await federation.restart_node("ident", data_dir=tmp_path / "empty-ident")
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.status == bk.INCOMPLETE and decision.ident.outcome == bk.UNTRUSTED
    kept = federation.kept(sample.booking)
    assert "below the floor of 1" in kept.ident.error
    assert kept.ident.band == bio.DECISION_BAND_UNSPECIFIED  # not NO_HIT


async def test_one_copied_finger_among_three_strangers_fingers_never_reaches_ice(
    federation: Federation, population: Population
) -> None:
    # One finger of an IDENT subject's booking with three fingers of people in neither gallery.
    mates = [b for b in population.bookings if b.truth.ident_subject_id and b.truth.expect_notification]
    strangers = [
        b for b in population.bookings if not b.truth.ident_subject_id and not b.truth.iafis_subject_id
    ]
    decisions = []
    for i, mate in enumerate(mates[:6]):
        fingers = {f.position: f for f in mate.booking.tenprint.fingers if f.WhichOneof("data") == "template"}
        other = {f.position: f for f in strangers[i % len(strangers)].booking.tenprint.fingers}
        copied = sorted(fingers)[0]
        mixed = with_tcn(mate.booking, f"TCN-MIXED-{i:02d}")
        del mixed.tenprint.fingers[:]
        mixed.tenprint.fingers.append(fingers[copied])
        mixed.tenprint.fingers.extend([other[p] for p in sorted(other) if p != copied][:3])
        await federation.booking_stub(mixed.ori).SubmitBooking(mixed, timeout=30)
        decisions.append(federation.kept(mixed))
    assert all(d.status == bk.COMPLETE for d in decisions)
    assert all(d.ident.band != bio.HIT and d.notification != bk.QUEUED for d in decisions)
    assert await federation.notifications() == []


def tampered(tmp_path: Path, name: str, *statements: str) -> tuple[str, Path]:
    """A filled log with a checkpoint of it elsewhere, then ``statements`` run on its file by
    someone who can drop the append-only triggers but has not the audit key."""
    path = tmp_path / f"{name}.sqlite"
    store = filled_store(f"sqlite:///{path}")
    checkpoints = tmp_path / f"{name}-checkpoints"
    write_checkpoint(checkpoints, AUDIT_KEY, *store.audit_head())
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER audit_log_no_update")
        db.execute("DROP TRIGGER audit_log_no_delete")
        for statement in statements:
            db.execute(statement)
    return f"sqlite:///{path}", checkpoints


def verify_cli(tmp_path: Path, url: str, checkpoints: Path) -> str:
    key = tmp_path / "audit.key"
    key.write_text(AUDIT_KEY.hex())
    result = CliRunner().invoke(
        app, ["audit", "verify", "--db", url, "--key", str(key), "--checkpoint", str(checkpoints)]
    )
    assert result.exit_code == 1, result.output
    return result.output


def test_audit_verify_finds_the_end_cut_and_the_head_rewritten_to_match(tmp_path: Path) -> None:
    def cut(name: str, keep: int) -> tuple[str, Path]:
        return tampered(
            tmp_path,
            name,
            f"DELETE FROM audit_log WHERE seq > {keep}",
            f"UPDATE audit_head SET entries = {keep}, "
            f"last_hash = (SELECT entry_hash FROM audit_log WHERE seq = {keep})",
        )

    assert "TCN-AUDIT-0" in verify_cli(tmp_path, *cut("two", 10))  # its delivery's record is gone
    # Cutting only the last entry (an event that changed nothing stored) leaves a log that is
    # whole by itself; only the checkpoint kept elsewhere still knows how long it was.
    url, checkpoints = cut("one", 11)
    store = CoordinatorStore(url, audit_key=AUDIT_KEY)
    assert store.verify_audit() == (11, None)
    store.close()
    assert "12 were checkpointed" in verify_cli(tmp_path, url, checkpoints)


def test_audit_verify_finds_every_entry_and_the_head_deleted(tmp_path: Path) -> None:
    url, checkpoints = tampered(tmp_path, "emptied", "DELETE FROM audit_log", "DELETE FROM audit_head")
    output = verify_cli(tmp_path, url, checkpoints)
    assert "never recorded" in output or "were checkpointed" in output


def test_audit_verify_finds_an_entry_edited_and_the_chain_rehashed_without_the_key(tmp_path: Path) -> None:
    path = tmp_path / "rehashed.sqlite"
    store = filled_store(f"sqlite:///{path}")
    checkpoints = tmp_path / "rehashed-checkpoints"
    write_checkpoint(checkpoints, AUDIT_KEY, *store.audit_head())
    store.close()
    # Rewrite entry 3 and re-chain everything after it with plain SHA-256, the best one can do
    # without the key.
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER audit_log_no_update")
        rows = db.execute(
            "SELECT seq, recorded_at, tcn, event, detail, payload FROM audit_log ORDER BY seq"
        ).fetchall()
        prev = GENESIS
        for seq, recorded_at, tcn, event, detail, payload in rows:
            if seq == 3:
                detail = "nothing happened"
            when = dt.datetime.fromisoformat(recorded_at)
            digest = entry_hash(prev, seq, when, tcn, event, detail, payload)
            db.execute(
                "UPDATE audit_log SET detail = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
                (detail, prev, digest, seq),
            )
            prev = digest
        db.execute("UPDATE audit_head SET last_hash = ?", (prev,))
    output = verify_cli(tmp_path, f"sqlite:///{path}", checkpoints)
    assert "entry 1" in output and "changed" in output


def test_audit_verify_finds_a_decision_edited_and_its_notice_dropped(tmp_path: Path) -> None:
    edited = decision("TCN-AUDIT-3", bk.NOT_REQUIRED).SerializeToString().hex()
    url, checkpoints = tampered(
        tmp_path,
        "quiet",
        f"UPDATE decisions SET decision = x'{edited}' WHERE tcn = 'XX0010000/TCN-AUDIT-3'",
        "DELETE FROM outbox WHERE tcn = 'XX0010000/TCN-AUDIT-3'",
    )
    output = verify_cli(tmp_path, url, checkpoints)
    assert "TCN-AUDIT-3" in output and "outside the log" in output


def test_an_operator_writes_to_a_keyed_audit_log_only_with_its_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'coordinator.sqlite'}"
    store = CoordinatorStore(url, audit_key=AUDIT_KEY)
    store.record_decision(decision("TCN-KEYED-1"), notification("TCN-KEYED-1"))
    later = dt.datetime.now(dt.UTC)
    assert store.mark_failed("XX0010000/TCN-KEYED-1", "UNAVAILABLE: down", later, max_attempts=1)
    store.close()
    runner = CliRunner()
    refused = runner.invoke(app, ["outbox", "retry", "XX0010000/TCN-KEYED-1", "--db", url])
    assert refused.exit_code != 0 and "chained under a key" in refused.output
    key = tmp_path / "audit.key"
    key.write_text(AUDIT_KEY.hex())
    assert (
        runner.invoke(
            app, ["outbox", "retry", "XX0010000/TCN-KEYED-1", "--db", url, "--key", str(key)]
        ).exit_code
        == 0
    )
    assert runner.invoke(app, ["audit", "verify", "--db", url, "--key", str(key)]).exit_code == 0
    # A coordinator started with another key refuses to fork the chain.
    wrong = CoordinatorStore(url, audit_key=bytes(32))
    assert not wrong.audit_key_fits()
    wrong.close()
