"""Every store on SQLite and on PostgreSQL through the same code: the schema comes from the Alembic
revisions and is exactly the models' schema, a database from before migrations is adopted, stores
opened at once upgrade once, and what the stores keep reads back the same on both."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from federation.store import MIGRATIONS as COORDINATOR
from federation.store import CoordinatorStore, ReviewConflict, Verdict
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.migrations import current, differences, upgrade
from fedprint.records.v1 import records_pb2 as rec
from fedprint.review.v1 import review_pb2 as rv
from fedprint.validation import booking_key
from ice_service.server import MIGRATIONS as ICE
from ice_service.server import IceStore
from nodes.gallery.partition import Partition, subject_bucket
from nodes.gallery.store import MIGRATIONS as GALLERY
from nodes.gallery.store import Enrollment, GalleryStore
from nodes.iafis.records import CriminalHistoryStore
from nodes.ident.records import ImmigrationHistoryStore

IAFIS = CriminalHistoryStore.migrations
IDENT = ImmigrationHistoryStore.migrations
ALL = [COORDINATOR, GALLERY, IAFIS, IDENT, ICE]


def test_the_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    # The five stores' tables do not collide, so one database holds them all here.
    engine = create_engine(database_url)
    upgrade(engine, ALL)
    with engine.connect() as connection:
        for migrations in ALL:
            assert differences(connection, migrations) == [], migrations.name
            assert current(engine, migrations) == migrations.head()
    # Upgrading again finds nothing to do.
    upgrade(engine, ALL)
    engine.dispose()


def test_a_database_from_before_migrations_is_adopted_and_upgraded(database_url: str) -> None:
    """The schema ``create_all`` made before migrations existed is the baseline revision: such a
    database (no version table) is stamped with it and upgraded, its rows kept."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        for migrations in (COORDINATOR, GALLERY, IAFIS):
            command.upgrade(migrations.config(connection), migrations.baseline or "")
            connection.execute(text(f"DROP TABLE {migrations.version_table}"))
        connection.execute(
            text("INSERT INTO gallery_subjects (subject_id, enrolled_at) VALUES ('UCN-OLD-1', :t)"),
            {"t": dt.datetime(2026, 1, 2, tzinfo=dt.UTC)},
        )
        connection.execute(text("INSERT INTO gallery_fingers VALUES ('UCN-OLD-1', 1, 1, :d)"), {"d": b"x"})
        connection.execute(text("INSERT INTO gallery_state (id, token) VALUES (1, 'old-token')"))
        connection.execute(
            text("INSERT INTO decisions VALUES ('TCN-OLD-1', 'XX0010000', 1, 1, :d, :t, '')"),
            {"d": bk.BookingDecision(tcn="TCN-OLD-1").SerializeToString(), "t": dt.datetime.now(dt.UTC)},
        )
        connection.commit()
    engine.dispose()

    gallery = GalleryStore(database_url, CriminalHistoryStore())
    coordinator = CoordinatorStore(database_url)
    try:
        (old,) = list(gallery.templates())
        assert (old.subject_id, old.version, old.templates) == ("UCN-OLD-1", 0, {1: (1, b"x")})
        assert gallery.state().token == "old-token"
        owner = Partition(subject_bucket("UCN-OLD-1") % 2, 2)
        assert [s.subject_id for s in gallery.templates(owner)] == ["UCN-OLD-1"]  # its bucket was computed
        stored = coordinator.decision("XX0010000/TCN-OLD-1")  # keyed by its ORI and TCN now
        assert stored is not None and stored.tcn == "TCN-OLD-1"
        coordinator.record_event(
            "XX0010000/TCN-OLD-1", "adopted", "the audit log works on the adopted schema"
        )
        # The chain holds; the decision row this test wrote behind the log's back does not.
        checked, broken = coordinator.verify_audit()
        assert checked == 1 and broken is not None
        assert (broken.tcn, broken.reason) == (
            "XX0010000/TCN-OLD-1",
            "a stored decision the log never recorded",
        )
    finally:
        gallery.close()
        coordinator.close()
    engine = create_engine(database_url)
    for migrations in (COORDINATOR, GALLERY, IAFIS):
        assert current(engine, migrations) == migrations.head()
    engine.dispose()


def test_stores_opened_at_once_upgrade_the_database_once(database_url: str) -> None:
    """Replicas starting together (the shards of a node, coordinator replicas) share one upgrade."""

    def open_gallery(_: int) -> int:
        store = GalleryStore(database_url, ImmigrationHistoryStore())
        try:
            return store.state().version
        finally:
            store.close()

    def open_coordinator(_: int) -> tuple[int, object]:
        store = CoordinatorStore(database_url)
        try:
            return store.verify_audit()
        finally:
            store.close()

    with ThreadPoolExecutor(6) as pool:
        galleries = list(pool.map(open_gallery, range(3)))
        coordinators = list(pool.map(open_coordinator, range(3)))
    assert galleries == [0, 0, 0] and coordinators == [(0, None)] * 3
    engine = create_engine(database_url)
    tables = set(inspect(engine).get_table_names())
    assert {"alembic_version_gallery", "alembic_version_ident", "alembic_version_coordinator"} <= tables
    engine.dispose()


def history(subject_id: str) -> rec.CriminalHistory:
    history = rec.CriminalHistory(subject_id=subject_id)
    history.descriptors.sex, history.descriptors.year_of_birth = "F", 1990
    arrest = history.arrests.add(ori="XX0010000", disposition=rec.CONVICTED)
    arrest.arrested_at.FromDatetime(dt.datetime(2020, 5, 1, 12, 30, tzinfo=dt.UTC))
    arrest.charges.add(ncic_code="1201", literal="ROBBERY", counts=2)
    return history


def test_the_gallery_store_counts_changes_and_serves_each_partition(database_url: str) -> None:
    store = GalleryStore(database_url, CriminalHistoryStore())
    try:
        ids = [f"UCN-{i:04d}" for i in range(12)]
        first = store.enroll([Enrollment(s, {1: (1, s.encode()), 2: (1, b"b")}, history(s)) for s in ids[:8]])
        second = store.enroll([Enrollment(s, {3: (1, b"c")}, history(s)) for s in [*ids[8:], ids[0]]])
        assert (first, second) == (1, 2) and store.state().version == 2
        # Changes since a version: the second enrolment, including the re-enrolled subject.
        assert [(s.subject_id, s.version) for s in store.templates(since=1)] == [
            (s, 2) for s in sorted([*ids[8:], ids[0]])
        ]
        assert next(store.templates()).templates == {3: (1, b"c")}  # re-enrolment replaced it
        removed, third = store.remove([ids[1], ids[2], "UCN-NOBODY"])
        assert (removed, third) == (2, 3)
        assert [(r.subject_id, r.version) for r in store.removals(since=2)] == [(ids[1], 3), (ids[2], 3)]
        assert store.remove(["UCN-NOBODY"]) == (0, 3)  # nothing changed, no new version
        store.enroll([Enrollment(ids[1], {1: (1, b"a")}, history(ids[1]))])  # back again
        assert [r.subject_id for r in store.removals(since=2)] == [ids[2]]
        # Partitions split the subjects between them, and their changes too.
        halves = [Partition(i, 2) for i in range(2)]
        held = [sorted(s.subject_id for s in store.templates(p)) for p in halves]
        assert sorted(held[0] + held[1]) == sorted(set(ids) - {ids[2]})
        assert all(p.owns(s) for p, h in zip(halves, held, strict=True) for s in h)
        assert sum(store.count(p) for p in halves) == store.count() == 11
        assert [r.subject_id for r in store.removals(halves[subject_bucket(ids[2]) % 2])] == [ids[2]]
        assert store.get_records([ids[3]])[ids[3]] == history(ids[3])
    finally:
        store.close()


def test_the_ice_store_keeps_one_notification_per_tcn_in_utc(database_url: str) -> None:
    store = IceStore(database_url)
    try:
        duplicate, first = store.add(ice.Notification(tcn="TCN-1", ori="XX0010000", level=rec.LEVEL_2))
        assert not duplicate and first.tzinfo is not None
        store.add(ice.Notification(tcn="TCN-2", ori="XX0010000", level=rec.LEVEL_1))
        duplicate, again = store.add(ice.Notification(tcn="TCN-1", ori="XX0010000", level=rec.LEVEL_2))
        assert duplicate and again == first and again.utcoffset() == dt.timedelta(0)
        assert [n.tcn for n, _ in store.list(10)] == ["TCN-2", "TCN-1"]  # level 1 first
        assert [n.tcn for n, _ in store.list(10, level=rec.LEVEL_2)] == ["TCN-1"]
    finally:
        store.close()


def opened(store: CoordinatorStore, tcn: str, nodes: tuple[str, ...] = ("ident",)) -> None:
    """A stored EXAMINER_REVIEW decision with an open review of each of ``nodes``."""
    decision = bk.BookingDecision(
        tcn=tcn, ori="XX0010000", status=bk.COMPLETE, notification=bk.EXAMINER_REVIEW, level=rec.LEVEL_3
    )
    for node in nodes:
        getattr(decision, node).candidates.add(subject_id=f"{node.upper()}-1", band=bio.REVIEW)
    reviews = [(rv.Review(node=node), b"sealed booking") for node in nodes]
    store.record_decision(decision, None, content="", reviews=reviews)


def test_a_confirm_and_a_reject_racing_end_with_one_verdict_and_a_notice_only_if_confirmed(
    database_url: str,
) -> None:
    store = CoordinatorStore(database_url)
    notice = ice.Notification(tcn="", ori="XX0010000", level=rec.LEVEL_1)
    rounds = 15
    for i in range(rounds):
        tcn = f"TCN-RACE-{i:02d}"
        opened(store, tcn)
        key = booking_key("XX0010000", tcn)  # what the store keys a booking by: its ORI and TCN
        store.claim_review(key, "ident", "examiner-a")
        notice.tcn = tcn
        verdicts = [
            Verdict(rv.CONFIRM, ("confirmed",), bk.QUEUED, notice),
            Verdict(rv.REJECT, ("rejected",), bk.NOT_REQUIRED),
        ]
        start = threading.Barrier(2)

        def decide(verdict: Verdict, key: str = key, start: threading.Barrier = start) -> str:
            start.wait()
            try:
                store.decide_review(key, "ident", "examiner-a", verdict, "")
            except ReviewConflict:
                return "refused"
            return "accepted"

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(decide, verdicts))
        assert sorted(outcomes) == ["accepted", "refused"], outcomes
        (review,) = [r for r in store.reviews([rv.CONFIRMED, rv.REJECTED], 100) if r.tcn == tcn]
        decision = store.decision(key)
        assert decision is not None
        # An ICE notice exists if and only if the verdict that stands is a confirmation.
        if review.state == rv.CONFIRMED:
            assert store.outbox_attempts(key) is not None and decision.notification == bk.QUEUED
        else:
            assert store.outbox_attempts(key) is None and decision.notification == bk.NOT_REQUIRED
    store.close()


def test_a_claim_runs_out_and_the_review_returns_to_the_queue(database_url: str) -> None:
    store = CoordinatorStore(database_url)
    opened(store, "TCN-CLAIM-1")
    key = booking_key("XX0010000", "TCN-CLAIM-1")
    store.claim_review(key, "ident", "examiner-a")
    with pytest.raises(ReviewConflict, match="claimed by examiner-a"):
        store.claim_review(key, "ident", "examiner-b")
    assert store.release_expired_claims(claim_s=3600) == 0  # a fresh claim stands
    assert store.release_expired_claims(claim_s=0) == 1  # one older than the claim time does not
    (review,) = store.reviews([rv.OPEN], 10)
    assert review.review_id == "XX0010000/TCN-CLAIM-1/ident" and review.examiner == ""
    store.claim_review(key, "ident", "examiner-b")
    with pytest.raises(ReviewConflict, match="claimed by examiner-b"):
        store.decide_review(key, "ident", "examiner-a", Verdict(rv.REJECT, (), bk.NOT_REQUIRED), "")
    assert [e for e, _ in store.audit(key)][-3:] == [
        "review_claimed",
        "review_claim_expired",
        "review_claimed",
    ]
    store.close()


def test_both_reviews_of_a_booking_decided_at_once_keep_both_verdicts(database_url: str) -> None:
    """A booking with an IAFIS and an IDENT candidate in the review band has two reviews; two
    examiners deciding them at the same moment each change the one stored decision, and neither
    change is lost (the decision row is locked for each verdict)."""
    store = CoordinatorStore(database_url)
    rounds = 8
    for i in range(rounds):
        tcn = f"TCN-BOTH-{i:02d}"
        opened(store, tcn, ("iafis", "ident"))
        key = booking_key("XX0010000", tcn)
        store.claim_review(key, "iafis", "examiner-a")
        store.claim_review(key, "ident", "examiner-b")
        history = rec.CriminalHistory(subject_id="IAFIS-1")
        iafis = Verdict(
            rv.CONFIRM,
            ("IAFIS confirmed",),
            level=rec.LEVEL_1,
            confirmed=gal.Candidate(subject_id="IAFIS-1", criminal_history=history),
        )
        ident = Verdict(rv.REJECT, ("IDENT rejected",), bk.NOT_REQUIRED)
        start = threading.Barrier(2)

        def decide(job: tuple[str, str, Verdict], key: str = key, start: threading.Barrier = start) -> None:
            node, examiner, verdict = job
            start.wait()
            store.decide_review(key, node, examiner, verdict, "")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(decide, [("iafis", "examiner-a", iafis), ("ident", "examiner-b", ident)]))
        decision = store.decision(key)
        assert decision is not None
        assert sorted(decision.reasons) == ["IAFIS confirmed", "IDENT rejected"]
        assert decision.level == rec.LEVEL_1 and decision.notification == bk.NOT_REQUIRED
        assert decision.iafis.confirmed_subject_id == "IAFIS-1" and not decision.ident.confirmed_subject_id
        assert decision.iafis.candidates[0].criminal_history.subject_id == "IAFIS-1"
    assert store.outbox_attempts(booking_key("XX0010000", "TCN-BOTH-00")) is None
    store.close()


def test_reviews_from_before_iafis_reviews_are_ident_reviews(database_url: str) -> None:
    """Revision 0005 keys a review by TCN and node; a review opened before it is IDENT's."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        command.upgrade(COORDINATOR.config(connection), "0004")
        connection.execute(
            text(
                "INSERT INTO reviews (tcn, ori, state, examiner, opened_at, note, review, sealed) "
                "VALUES ('TCN-OLD-R', 'XX0010000', :state, '', :t, '', :r, :s)"
            ),
            {"state": rv.OPEN, "t": dt.datetime.now(dt.UTC), "r": rv.Review().SerializeToString(), "s": b"x"},
        )
        connection.commit()
    engine.dispose()
    store = CoordinatorStore(database_url)
    try:
        (review,) = store.reviews([rv.OPEN], 10)
        assert (review.review_id, review.tcn, review.node) == (
            "XX0010000/TCN-OLD-R/ident",
            "TCN-OLD-R",
            "ident",
        )
        engine = create_engine(database_url)
        key = inspect(engine).get_pk_constraint("reviews")["constrained_columns"]
        engine.dispose()
        assert sorted(key) == ["node", "tcn"]
    finally:
        store.close()


def test_bookings_from_before_are_keyed_by_their_ori_and_tcn(database_url: str) -> None:
    """Revision 0007 keys every row of a booking ``ORI/TCN``, taking the ORI from its decision;
    the audit entries keep their TCN and still verify. ICE's revision 0002 does the same from the
    notices it holds."""
    store = CoordinatorStore(database_url)
    now = dt.datetime.now(dt.UTC)
    decision = bk.BookingDecision(tcn="TCN-MIG-1", ori="XX0020000", status=bk.INCOMPLETE, attempt=1)
    store.record_decision(decision, None, sealed=(b"booking", b"evidence"), retry_at=now)
    store.close()
    engine = create_engine(database_url)
    with engine.connect() as connection:
        # The rows as revision 0006 kept them: by the TCN alone.
        command.downgrade(COORDINATOR.config(connection), "0006")
        assert connection.execute(text("SELECT tcn FROM pending_bookings")).scalar() == "TCN-MIG-1"
        connection.commit()
    engine.dispose()
    store = CoordinatorStore(database_url)
    try:
        key = booking_key("XX0020000", "TCN-MIG-1")
        assert store.decision(key) == decision and store.decision("TCN-MIG-1") is None
        sealed = store.sealed_booking(key)
        assert sealed is not None and (sealed.tcn, sealed.sealed) == (key, b"booking")
        assert store.verify_audit()[1] is None  # the entry under the bare TCN is the booking's
    finally:
        store.close()

    ice_store = IceStore(database_url)
    ice_store.add(ice.Notification(tcn="TCN-MIG-2", ori="XX0020000", level=rec.LEVEL_1))
    ice_store.close()
    engine = create_engine(database_url)
    with engine.connect() as connection:
        command.downgrade(ICE.config(connection), "0001")
        connection.commit()
        command.upgrade(ICE.config(connection), "head")
        connection.commit()
        assert connection.execute(text("SELECT tcn FROM notifications")).scalar() == "XX0020000/TCN-MIG-2"
    engine.dispose()
    ice_store = IceStore(database_url)
    try:  # the same notice again is a duplicate; another agency's of the same TCN is not
        assert ice_store.add(ice.Notification(tcn="TCN-MIG-2", ori="XX0020000", level=rec.LEVEL_1))[0]
        assert not ice_store.add(ice.Notification(tcn="TCN-MIG-2", ori="XX0010000", level=rec.LEVEL_1))[0]
    finally:
        ice_store.close()
