"""The coordinator's durable state, in one database so that what belongs together commits
together: the latest decision per TCN, the hash-chained append-only audit log, the
notification outbox and its dead letters, and the sealed bookings of incomplete decisions.

Every row of a booking is keyed by the booking's key, ``ORI/TCN``
(:func:`fedprint.validation.booking_key`), which is what the ``tcn`` columns hold and what the
methods here call ``tcn``: a TCN is its agency's own, so what one agency sends never meets another
agency's booking. (Audit entries written before keys were ``ORI/TCN`` name the TCN alone.)

SQLite or PostgreSQL, by URL, through the same code; the schema is the Alembic revisions in
``federation/migrations``, applied when the store opens its database. Several coordinator
replicas may share one database: the outbox deliverer and the retrier of incomplete bookings
*claim* the rows they work on (a claim token and an expiry on the row, taken with one conditional
UPDATE; on PostgreSQL the candidates are picked with ``FOR UPDATE SKIP LOCKED`` so replicas do not
queue behind each other), so no two replicas deliver or retry the same row at once, and a
replica that dies mid-work leaves its claims to expire. A replica with a stable name
(``replica_id``: a StatefulSet pod's name, the launcher's service name) marks its claims with it,
and when it starts again after a crash it takes back at once what its dead life held
(:meth:`CoordinatorStore.release_own_claims`) instead of waiting out the leases.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Integer, LargeBinary, String, Text, case, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from federation.audit import (
    GENESIS,
    AuditEntry,
    ChainBreak,
    content_digest,
    entry_hash,
    parse_state,
    state_record,
    verify_chain,
)
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.database import connect
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.migrations import Migrations, upgrade
from fedprint.records.v1 import records_pb2 as rec
from fedprint.review.v1 import review_pb2 as rv
from fedprint.validation import booking_key, booking_of


class _Base(DeclarativeBase):
    pass


class DecisionRow(_Base):
    __tablename__ = "decisions"
    tcn: Mapped[str] = mapped_column(String(64), primary_key=True)
    ori: Mapped[str] = mapped_column(String(9), index=True)
    status: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    decision: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    #: Digests of the booking's parts (see federation.resubmission): a resubmitted TCN must match.
    content: Mapped[str] = mapped_column(Text, default="")


class AuditRow(_Base):
    """Append-only (triggers on SQLite and PostgreSQL, made by the baseline migration) and
    hash-chained (federation.audit)."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    tcn: Mapped[str] = mapped_column(String(64), index=True)
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))


class AuditHead(_Base):
    """One row: how many entries the log has and the hash of the last."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    entries: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))


class OutboxRow(_Base):
    """A notice for ICE. Once ICE acknowledges it, the notice itself (the immigration record in
    it) is purged: the row keeps the TCN, the level and the notice's digest, what audit needs."""

    __tablename__ = "outbox"
    tcn: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The ice.v1.Notification; empty once delivered.
    notification: Mapped[bytes] = mapped_column(LargeBinary)
    #: Its records.v1.ThreatLevel and SHA-256 (hex), kept when the notice is purged.
    level: Mapped[int] = mapped_column(Integer, server_default="0")
    digest: Mapped[str] = mapped_column(String(64), server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    #: The claim of the replica delivering it (see the module's docstring), until when it holds.
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeadLetterRow(_Base):
    """A notification that used up its attempts; it waits here for an operator's retry."""

    __tablename__ = "outbox_dead_letters"
    tcn: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The notice; empty once the dead-letter retention has passed (it can no longer be retried).
    notification: Mapped[bytes] = mapped_column(LargeBinary)
    level: Mapped[int] = mapped_column(Integer, server_default="0")
    digest: Mapped[str] = mapped_column(String(64), server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer)
    dead_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(Text)


def _outbox_row(tcn: str, notification: ice.Notification, now: dt.datetime) -> OutboxRow:
    """A new outbox entry for ``notification``, due now."""
    payload = notification.SerializeToString()
    return OutboxRow(
        tcn=tcn,
        notification=payload,
        level=notification.level,
        digest=content_digest(payload),
        created_at=now,
        attempts=0,
        next_attempt_at=now,
        last_error="",
    )


class PendingBookingRow(_Base):
    """An incomplete booking, sealed (federation.sealing), kept until its decision is final."""

    __tablename__ = "pending_bookings"
    tcn: Mapped[str] = mapped_column(String(64), primary_key=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    #: The last attempt's full evidence (records included), sealed the same way.
    sealed_evidence: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    retries: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    #: The claim of the replica retrying it (see the module's docstring), until when it holds.
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ReviewRow(_Base):
    """An examiner review of a booking's borderline match on one node (fedprint.review.v1)."""

    __tablename__ = "reviews"
    tcn: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: "iafis" or "ident": a booking has a review per node whose candidate is in the review band.
    node: Mapped[str] = mapped_column(String(8), primary_key=True)
    ori: Mapped[str] = mapped_column(String(9), index=True)
    state: Mapped[int] = mapped_column(Integer, index=True)
    examiner: Mapped[str] = mapped_column(Text, default="")
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When the current claim was taken; a claim older than the coordinator's claim time runs out.
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    #: The review.v1.Review as opened (candidate scores, thresholds, level, reasons).
    review: Mapped[bytes] = mapped_column(LargeBinary)
    #: The booking, sealed (federation.sealing) for the examiner's comparison; emptied once decided.
    sealed: Mapped[bytes] = mapped_column(LargeBinary)


def _state_name(state: int) -> str:
    return rv.ReviewState.Name(rv.ReviewState.ValueType(state)).lower()


#: Events that changed a stored decision or notice; before state records they carried none.
_STATE_EVENTS = frozenset(
    {
        "notification_queued",
        "notification_delivered",
        "notification_dead_lettered",
        "notification_requeued",
        "notification_purged",
        "review_confirmed",
        "review_rejected",
    }
)


def _contents_break(
    entries: Sequence[AuditEntry], decisions: dict[str, bytes], notices: dict[str, bytes]
) -> ChainBreak | None:
    """The first stored decision or notice that differs from what the log last recorded for its
    TCN, or that the log never recorded; None when all agree. A TCN whose last change predates
    state records (an older log) is not checked."""
    expected: dict[str, tuple[str | None, str | None, int]] = {}
    # Entries from before keys were ORI/TCN name the TCN alone, which was unique then.
    legacy = {booking_of(key)[1]: key for key in [*decisions, *notices] if "/" in key}
    for e in entries:
        key = e.tcn if "/" in e.tcn else legacy.get(e.tcn, e.tcn)
        decision, notice, _ = expected.get(key, ("none", "none", 0))
        if e.event == "decision":
            decision = content_digest(e.payload)
        elif (state := parse_state(e.payload)) is not None:
            decision, notice = state
        elif e.event in _STATE_EVENTS:
            decision = notice = None  # changed without a record: unknown from here on
        else:
            continue
        expected[key] = (decision, notice, e.seq)
    for tcn, (decision, notice, seq) in expected.items():
        if decision is not None and content_digest(decisions.get(tcn)) != decision:
            what = "deleted" if tcn not in decisions else "changed"
            return ChainBreak(seq, tcn, f"the stored decision was {what} outside the log")
        if notice is not None and content_digest(notices.get(tcn)) != notice:
            what = "dropped" if tcn not in notices else "changed"
            return ChainBreak(seq, tcn, f"the ICE notice was {what} outside the log")
    for tcn in sorted(set(decisions) - set(expected)):
        return ChainBreak(0, tcn, "a stored decision the log never recorded")
    return None


def _rows_changed(result: Any) -> int:
    """How many rows an UPDATE changed (SQLAlchemy types ``Session.execute`` without it)."""
    return int(getattr(result, "rowcount", 0) or 0)


#: The nodes whose candidates examiners review.
REVIEW_NODES = ("iafis", "ident")


def review_id(tcn: str, node: str) -> str:
    """The review of ``node``'s candidate for the booking keyed ``tcn``: "<ORI>/<TCN>/<node>"."""
    return f"{tcn}/{node}"


def parse_review_id(text: str) -> tuple[str, str]:
    """(booking key, node) of a review id; ValueError when it names no booking or no node. (An
    ORI and a TCN hold no "/".)"""
    key, _, node = text.rpartition("/")
    ori, tcn = booking_of(key)
    if not ori or not tcn or "/" in tcn or node not in REVIEW_NODES:
        raise ValueError(f"a review id is <ORI>/<TCN>/{' or <ORI>/<TCN>/'.join(REVIEW_NODES)}")
    return key, node


def _not_held(row: ReviewRow) -> str:
    held = f"claimed by {row.examiner}" if row.state == rv.CLAIMED else _state_name(row.state)
    return f"review {review_id(row.tcn, row.node)} is {held}; claim it before deciding"


class ReviewConflict(Exception):
    """A review cannot move as asked: another examiner holds it, or it is already decided."""


@dataclass(frozen=True)
class Verdict:
    """What an examiner's verdict does to the stored decision: the reasons to add; the
    notification state the policy gives it (None: unchanged) and the ICE notice to queue (only
    with QUEUED); the threat level it now has (None: unchanged); and the candidate confirmed,
    with the record the agency may see from now on (an IAFIS candidate's criminal history)."""

    verdict: rv.Verdict.ValueType
    reasons: tuple[str, ...]
    notification_state: bk.NotificationState.ValueType | None = None
    notification: ice.Notification | None = None
    level: rec.ThreatLevel.ValueType | None = None
    confirmed: gal.Candidate | None = None
    #: The reasons the booking agency may read (never an examiner's note, nothing of IDENT).
    agency_reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The invariant the store keeps: an ICE notice exists if and only if a confirmation queued it.
        if (self.notification is not None) != (self.notification_state == bk.QUEUED):
            raise ValueError("a notice goes with QUEUED, and only with it")
        if self.verdict != rv.CONFIRM and (self.notification is not None or self.confirmed is not None):
            raise ValueError("only a confirmation queues a notice or confirms a candidate")

    def apply(self, decision: bk.BookingDecision, node: str) -> None:
        """Changes ``decision`` (``node``'s review decided) as the verdict says."""
        decision.reasons.extend(self.reasons)
        decision.agency_reasons.extend(self.agency_reasons)
        if self.notification_state is not None:
            decision.notification = self.notification_state
        if self.level is not None:
            decision.level = self.level
        if self.confirmed is not None:
            result: bk.NodeResult = getattr(decision, node)
            result.confirmed_subject_id = self.confirmed.subject_id
            for candidate in result.candidates:
                if candidate.subject_id == self.confirmed.subject_id and self.confirmed.WhichOneof("record"):
                    candidate.MergeFrom(self.confirmed)


#: The coordinator database's schema history (``federation/migrations``).
MIGRATIONS = Migrations(
    name="coordinator",
    versions=Path(__file__).with_name("migrations"),
    metadata=_Base.metadata,
    baseline="0001",
    baseline_table="decisions",
)


@dataclass(frozen=True)
class PendingNotification:
    tcn: str
    notification: ice.Notification
    attempts: int


@dataclass(frozen=True)
class OutboxEntry:
    """A notification not yet acknowledged: pending in the outbox, or a dead letter."""

    tcn: str
    level: int
    attempts: int
    created_at: dt.datetime
    last_error: str
    dead: bool
    #: A dead letter whose notice was purged after the retention: it can no longer be sent.
    purged: bool = False


class DeadLetterPurged(Exception):
    """A dead letter past its retention: its notice is gone, and it cannot be sent again."""


@dataclass(frozen=True)
class PendingBooking:
    """A sealed incomplete booking, and the sealed evidence of its last attempt."""

    tcn: str
    sealed: bytes
    sealed_evidence: bytes
    retries: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; everything stored here is UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _set_notification_state(session: Session, tcn: str, state: bk.NotificationState.ValueType) -> None:
    row = session.get(DecisionRow, tcn)
    if row is not None:
        decision = bk.BookingDecision.FromString(row.decision)
        decision.notification = state
        row.decision = decision.SerializeToString()


def _claimable(row: Any, now: dt.datetime) -> Any:
    """Rows of ``row``'s table that no replica holds a live claim on."""
    return or_(row.claimed_until.is_(None), row.claimed_until < now)


def _due_or_claim_expiry(row: Any) -> Any:
    """When a row is next worth looking at: when it falls due, or when another replica's claim on
    it runs out, whichever is later."""
    return case(
        (row.claimed_until > row.next_attempt_at, row.claimed_until),
        else_=row.next_attempt_at,
    )


class CoordinatorStore:
    """Decisions, audit log, outbox and sealed incomplete bookings of the coordinator."""

    def __init__(self, url: str, replica_id: str | None = None, *, audit_key: bytes | None = None) -> None:
        """``audit_key``: the key of the audit log's MAC chain (:mod:`federation.audit`); the
        coordinator always has one, and tools that verify the log need the same."""
        self.audit_key = audit_key
        self._engine = connect(url)
        upgrade(self._engine, [MIGRATIONS])
        # Claim tokens fit the 32-character column: 8 hex of the replica's name (when it has one),
        # then a random part that tells this life's claims from every other's.
        self._claim_prefix = hashlib.sha256(replica_id.encode()).hexdigest()[:8] if replica_id else ""
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            with self._sessions.begin() as session:
                # A new log gets its head; a log whose head was deleted does not get a fresh one,
                # which would make the remains look like a new, intact log.
                empty = session.scalar(select(func.count()).select_from(AuditRow)) == 0
                if session.get(AuditHead, 1) is None and empty:
                    session.add(AuditHead(id=1, entries=0, last_hash=GENESIS))
        except IntegrityError:
            pass  # another process created it first

    # ------------------------------------------------------------------ audit

    def _append_audit(self, session: Session, tcn: str, event: str, detail: str, payload: bytes) -> None:
        # The head is written before it is read: on SQLite the write takes the database's write
        # lock, on PostgreSQL the row lock, so concurrent appends queue up and never share a
        # previous hash.
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(entries=AuditHead.entries + 1))
        seq, prev = session.execute(
            select(AuditHead.entries, AuditHead.last_hash).where(AuditHead.id == 1)
        ).one()
        now = _now()
        digest = entry_hash(prev, seq, now, tcn, event, detail, payload, self.audit_key)
        session.add(
            AuditRow(
                seq=seq,
                recorded_at=now,
                tcn=tcn,
                event=event,
                detail=detail,
                payload=payload,
                prev_hash=prev,
                entry_hash=digest,
            )
        )
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(last_hash=digest))

    @staticmethod
    def _state(session: Session, tcn: str) -> bytes:
        """``tcn``'s state record as this transaction leaves it (:func:`federation.audit.state_record`)."""
        session.flush()
        decision = session.get(DecisionRow, tcn)
        notice = session.get(OutboxRow, tcn) or session.get(DeadLetterRow, tcn)
        return state_record(
            decision.decision if decision is not None else None,
            notice.notification if notice is not None else None,
        )

    def record_event(self, tcn: str, event: str, detail: str) -> None:
        """Appends an audit entry that belongs to no other write (a refusal, an operator's act)."""
        with self._sessions.begin() as session:
            self._append_audit(session, tcn, event, detail, b"")

    def audit(self, tcn: str) -> list[tuple[str, str]]:
        """(event, detail) of a TCN's audit entries, oldest first."""
        with self._sessions() as session:
            rows = session.execute(
                select(AuditRow.event, AuditRow.detail).where(AuditRow.tcn == tcn).order_by(AuditRow.seq)
            )
            return [(e, d) for e, d in rows]

    def audit_key_fits(self) -> bool:
        """Whether the store's audit key is the one the log was chained with (an empty log fits
        any): appending under another key would leave a log that no key verifies."""
        with self._sessions() as session:
            first = session.scalars(select(AuditRow).where(AuditRow.seq == 1)).first()
        if first is None:
            return True
        mac = entry_hash(
            first.prev_hash,
            1,
            first.recorded_at,
            first.tcn,
            first.event,
            first.detail,
            first.payload,
            self.audit_key,
        )
        return mac == first.entry_hash

    def audit_head(self) -> tuple[int, str]:
        """(entries, MAC of the last one) of the log: what a checkpoint records."""
        with self._sessions() as session:
            head = session.get(AuditHead, 1)
            return (head.entries, head.last_hash) if head is not None else (0, GENESIS)

    def audit_hash_at(self, seq: int) -> str | None:
        """The MAC of entry ``seq``, None when the log has no such entry."""
        with self._sessions() as session:
            return session.scalar(select(AuditRow.entry_hash).where(AuditRow.seq == seq))

    def verify_audit(self) -> tuple[int, ChainBreak | None]:
        """(entries checked, the first break or None) over the whole log: the chain under the
        store's audit key, then every stored decision and notice against the digests the log
        recorded for it last."""
        with self._sessions() as session:
            head = session.get(AuditHead, 1)
            rows = session.scalars(select(AuditRow).order_by(AuditRow.seq)).all()
            entries = [
                AuditEntry(
                    r.seq, r.recorded_at, r.tcn, r.event, r.detail, r.payload, r.prev_hash, r.entry_hash
                )
                for r in rows
            ]
            decisions = {
                tcn: content
                for tcn, content in session.execute(select(DecisionRow.tcn, DecisionRow.decision))
            }
            notices = {
                tcn: content
                for table in (OutboxRow, DeadLetterRow)
                for tcn, content in session.execute(select(table.tcn, table.notification))
            }
        if head is None and entries:
            return len(entries), ChainBreak(entries[-1].seq, entries[-1].tcn, "the log's head was deleted")
        head_entries, head_hash = (head.entries, head.last_hash) if head is not None else (0, GENESIS)
        broken = verify_chain(entries, head_entries, head_hash, self.audit_key)
        if broken is not None and broken.seq == 1 and broken.reason.startswith("its content"):
            # The very first entry fails: more likely the key than an edit.
            broken = ChainBreak(1, broken.tcn, broken.reason + " (or the audit key given is not the log's)")
        return len(entries), broken or _contents_break(entries, decisions, notices)

    # ------------------------------------------------------------------ decisions

    def decision(self, tcn: str) -> bk.BookingDecision | None:
        with self._sessions() as session:
            row = session.get(DecisionRow, tcn)
            return None if row is None else bk.BookingDecision.FromString(row.decision)

    def booking_content(self, tcn: str) -> str | None:
        """The content digests stored with a TCN's decision, None when there is no decision."""
        with self._sessions() as session:
            row = session.get(DecisionRow, tcn)
            return None if row is None else row.content

    def record_decision(
        self,
        decision: bk.BookingDecision,
        notification: ice.Notification | None,
        *,
        content: str = "",
        sealed: tuple[bytes, bytes] | None = None,
        retry_at: dt.datetime | None = None,
        retries: int = 0,
        reviews: Sequence[tuple[rv.Review, bytes]] = (),
    ) -> None:
        """Stores the decision, appends it to the audit log and queues the notification, atomically.

        ``reviews`` (each review as opened, its ``node`` set, and the sealed booking) open
        examiner reviews with the decision, each unless the booking has one for that node already.

        An incomplete decision keeps ``sealed`` (the sealed booking and the sealed evidence) for
        the coordinator's own retries, due at ``retry_at``; a complete one deletes them in the
        same transaction.
        """
        now = _now()
        payload = decision.SerializeToString()
        key = booking_key(decision.ori, decision.tcn)
        with self._sessions.begin() as session:
            row = session.get(DecisionRow, key)
            if row is None:
                session.add(
                    DecisionRow(
                        tcn=key,
                        ori=decision.ori,
                        status=decision.status,
                        attempt=decision.attempt,
                        decision=payload,
                        updated_at=now,
                        content=content,
                    )
                )
            else:
                row.status, row.attempt, row.decision, row.updated_at = (
                    decision.status,
                    decision.attempt,
                    payload,
                    now,
                )
            self._append_audit(session, key, "decision", "; ".join(decision.reasons), payload)
            if notification is not None and session.get(OutboxRow, key) is None:
                session.add(_outbox_row(key, notification, now))
                self._append_audit(session, key, "notification_queued", "", self._state(session, key))
            for opened, sealed_booking in reviews:
                if session.get(ReviewRow, (key, opened.node)) is not None:
                    continue
                session.add(
                    ReviewRow(
                        tcn=key,
                        node=opened.node,
                        ori=decision.ori,
                        state=rv.OPEN,
                        examiner="",
                        opened_at=now,
                        note="",
                        review=opened.SerializeToString(),
                        sealed=sealed_booking,
                    )
                )
                self._append_audit(
                    session,
                    key,
                    "review_opened",
                    f"{opened.node} {opened.candidate.subject_id}",
                    b"",
                )
            pending = session.get(PendingBookingRow, key)
            if decision.status == bk.COMPLETE:
                if pending is not None:
                    session.delete(pending)
            elif sealed is not None and retry_at is not None:
                if pending is None:
                    session.add(
                        PendingBookingRow(
                            tcn=key,
                            sealed=sealed[0],
                            sealed_evidence=sealed[1],
                            created_at=now,
                            retries=retries,
                            next_attempt_at=retry_at,
                        )
                    )
                else:
                    pending.sealed, pending.sealed_evidence = sealed
                    pending.retries, pending.next_attempt_at = retries, retry_at
                    pending.claimed_by, pending.claimed_until = None, None

    # ------------------------------------------------------------------ incomplete bookings

    def claim_due_bookings(self, lease_s: float, limit: int = 4) -> list[PendingBooking]:
        """Claims up to ``limit`` due bookings that no replica holds, for ``lease_s`` seconds, and
        returns them, oldest due first. The claim ends when the booking's next attempt is stored
        (:meth:`record_decision`, :meth:`reschedule_booking`) or when the lease runs out."""
        rows = self._claim(PendingBookingRow, PendingBookingRow.next_attempt_at, lease_s, limit)
        return [PendingBooking(r.tcn, r.sealed, r.sealed_evidence, r.retries) for r in rows]

    def reschedule_booking(self, tcn: str, retry_at: dt.datetime) -> None:
        """Moves a sealed booking's next retry to ``retry_at`` (counting one more retry) and ends
        any claim on it."""
        with self._sessions.begin() as session:
            row = session.get(PendingBookingRow, tcn)
            if row is not None:
                row.retries += 1
                row.next_attempt_at = retry_at
                row.claimed_by, row.claimed_until = None, None

    def next_booking_due_at(self) -> dt.datetime | None:
        """When the next sealed booking falls due (or another replica's claim on one runs out)."""
        with self._sessions() as session:
            due = session.scalar(select(func.min(_due_or_claim_expiry(PendingBookingRow))))
            return None if due is None else _aware(due)

    def _claim(self, row: Any, due: Any, lease_s: float, limit: int, *criteria: Any) -> list[Any]:
        """Claims up to ``limit`` rows of ``row``'s table that are due (``due`` has passed), meet
        ``criteria`` and are free; returns them, earliest due first.

        One UPDATE takes them: its WHERE clause re-checks that each row is still free, so two
        replicas claiming at once never both get a row (SQLite runs one writer at a time; on
        PostgreSQL the UPDATE re-reads a row another transaction changed before it writes). The
        candidates are locked with SKIP LOCKED on PostgreSQL, so a second replica takes the next
        rows instead of waiting for the first one's.
        """
        now = _now()
        token = self._claim_prefix + uuid.uuid4().hex[len(self._claim_prefix) :]
        free = _claimable(row, now)
        candidates = (
            select(row.tcn)
            .where(due <= now, free, *criteria)
            .order_by(due)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._sessions.begin() as session:
            session.execute(
                update(row)
                .where(row.tcn.in_(candidates), free)
                .values(claimed_by=token, claimed_until=now + dt.timedelta(seconds=lease_s))
                .execution_options(synchronize_session=False)
            )
            return list(session.scalars(select(row).where(row.claimed_by == token).order_by(due)))

    def release_own_claims(self) -> int:
        """Ends every claim marked with this store's replica name: called as the replica starts,
        when any such claim is a dead life's (nothing of this life has claimed yet). Returns how
        many rows it freed; none without a replica name (claims of an unnamed replica expire)."""
        if not self._claim_prefix:
            return 0
        freed = 0
        with self._sessions.begin() as session:
            for row in (OutboxRow, PendingBookingRow):
                result = session.execute(
                    update(row)
                    .where(row.claimed_by.startswith(self._claim_prefix, autoescape=True))
                    .values(claimed_by=None, claimed_until=None)
                    .execution_options(synchronize_session=False)
                )
                freed += _rows_changed(result)
        return freed

    def sealed_booking(self, tcn: str) -> PendingBooking | None:
        """The sealed booking and evidence kept for ``tcn`` while its decision is incomplete."""
        with self._sessions() as session:
            r = session.get(PendingBookingRow, tcn)
            return None if r is None else PendingBooking(r.tcn, r.sealed, r.sealed_evidence, r.retries)

    # ------------------------------------------------------------------ outbox

    def due_notifications(self, limit: int = 64) -> list[PendingNotification]:
        """Undelivered notifications whose next attempt is due, oldest due first (claimed or not)."""
        with self._sessions() as session:
            rows = session.scalars(
                select(OutboxRow)
                .where(OutboxRow.delivered_at.is_(None), OutboxRow.next_attempt_at <= _now())
                .order_by(OutboxRow.next_attempt_at)
                .limit(limit)
            )
            return [
                PendingNotification(r.tcn, ice.Notification.FromString(r.notification), r.attempts)
                for r in rows
            ]

    def claim_due_notifications(self, lease_s: float, limit: int = 16) -> list[PendingNotification]:
        """Claims up to ``limit`` due notifications that no replica holds, for ``lease_s`` seconds,
        and returns them, oldest due first. The claim ends with the attempt's outcome
        (:meth:`mark_delivered`, :meth:`mark_failed`) or when the lease runs out."""
        rows = self._claim(
            OutboxRow, OutboxRow.next_attempt_at, lease_s, limit, OutboxRow.delivered_at.is_(None)
        )
        return [
            PendingNotification(r.tcn, ice.Notification.FromString(r.notification), r.attempts) for r in rows
        ]

    def next_due_at(self) -> dt.datetime | None:
        """When the next notification falls due (or another replica's claim on one runs out)."""
        with self._sessions() as session:
            due = session.scalar(
                select(func.min(_due_or_claim_expiry(OutboxRow))).where(OutboxRow.delivered_at.is_(None))
            )
            return None if due is None else _aware(due)

    def mark_delivered(self, tcn: str, duplicate: bool) -> None:
        """Closes the outbox entry, purging the notice (ICE has it; the row keeps TCN, level and
        digest), and moves the stored decision to DELIVERED."""
        with self._sessions.begin() as session:
            session.execute(
                update(OutboxRow)
                .where(OutboxRow.tcn == tcn)
                .values(delivered_at=_now(), notification=b"", claimed_by=None, claimed_until=None)
            )
            _set_notification_state(session, tcn, bk.DELIVERED)
            detail = "acknowledged (already received)" if duplicate else "acknowledged"
            self._append_audit(session, tcn, "notification_delivered", detail, self._state(session, tcn))

    def mark_failed(self, tcn: str, error: str, retry_at: dt.datetime, max_attempts: int) -> bool:
        """Counts a failed delivery; at ``max_attempts`` the entry becomes a dead letter (the
        decision UNDELIVERABLE, audited). Returns whether it did."""
        with self._sessions.begin() as session:
            row = session.get(OutboxRow, tcn)
            if row is None or row.delivered_at is not None:
                return False
            row.attempts += 1
            row.last_error = error
            row.next_attempt_at = retry_at
            row.claimed_by, row.claimed_until = None, None
            if row.attempts < max_attempts:
                return False
            session.add(
                DeadLetterRow(
                    tcn=tcn,
                    notification=row.notification,
                    level=row.level,
                    digest=row.digest,
                    created_at=row.created_at,
                    attempts=row.attempts,
                    dead_at=_now(),
                    last_error=error,
                )
            )
            session.delete(row)
            _set_notification_state(session, tcn, bk.UNDELIVERABLE)
            self._append_audit(
                session,
                tcn,
                "notification_dead_lettered",
                f"{row.attempts} attempts; last: {error}",
                self._state(session, tcn),
            )
            return True

    def retry_dead_letter(self, tcn: str, operator: str) -> bool:
        """Puts a dead letter back into the outbox with fresh attempts (audited with the
        operator); False when ``tcn`` has no dead letter. Raises :class:`DeadLetterPurged` when
        its notice was purged after the retention."""
        with self._sessions.begin() as session:
            dead = session.get(DeadLetterRow, tcn)
            if dead is None:
                return False
            if not dead.notification:
                raise DeadLetterPurged(
                    f"the dead letter of {tcn} was purged after its retention "
                    "(outbox_dead_letter_retention_s): its notice can no longer be sent"
                )
            session.add(
                OutboxRow(
                    tcn=tcn,
                    notification=dead.notification,
                    level=dead.level,
                    digest=dead.digest,
                    created_at=dead.created_at,
                    attempts=0,
                    next_attempt_at=_now(),
                    last_error=dead.last_error,
                )
            )
            session.delete(dead)
            _set_notification_state(session, tcn, bk.QUEUED)
            self._append_audit(
                session, tcn, "notification_requeued", f"by {operator}", self._state(session, tcn)
            )
            return True

    def outbox_attempts(self, tcn: str) -> tuple[int, bool] | None:
        """(attempts, delivered) of a TCN's outbox entry, None when it has none."""
        with self._sessions() as session:
            row = session.get(OutboxRow, tcn)
            return None if row is None else (row.attempts, row.delivered_at is not None)

    def undelivered(self) -> list[OutboxEntry]:
        """Every notification ICE has not acknowledged: dead letters first, then pending, oldest first."""
        with self._sessions() as session:
            dead = session.scalars(select(DeadLetterRow).order_by(DeadLetterRow.created_at)).all()
            pending = session.scalars(
                select(OutboxRow).where(OutboxRow.delivered_at.is_(None)).order_by(OutboxRow.created_at)
            ).all()
            return [
                OutboxEntry(
                    r.tcn,
                    r.level,
                    r.attempts,
                    _aware(r.created_at),
                    r.last_error,
                    dead_letter,
                    purged=not r.notification,
                )
                for rows, dead_letter in ((dead, True), (pending, False))
                for r in rows
            ]

    def purge_notices(self, dead_letter_retention_s: float) -> int:
        """Purges the notices that outlived their purpose (audited, each keeping TCN, level and
        digest): those ICE acknowledged (before deliveries purged them at once), and dead letters
        older than ``dead_letter_retention_s``. Returns how many."""
        cutoff = _now() - dt.timedelta(seconds=dead_letter_retention_s)
        purged = 0
        with self._sessions.begin() as session:
            rows: list[OutboxRow | DeadLetterRow] = [
                *session.scalars(
                    select(OutboxRow).where(
                        OutboxRow.delivered_at.is_not(None), OutboxRow.notification != b""
                    )
                ),
                *session.scalars(
                    select(DeadLetterRow).where(
                        DeadLetterRow.dead_at < cutoff, DeadLetterRow.notification != b""
                    )
                ),
            ]
            for row in rows:
                row.notification = b""
                what = (
                    "acknowledged by ICE" if isinstance(row, OutboxRow) else "dead letter past its retention"
                )
                self._append_audit(
                    session, row.tcn, "notification_purged", what, self._state(session, row.tcn)
                )
                purged += 1
        return purged

    # ------------------------------------------------------------------ examiner reviews

    @staticmethod
    def _review(row: ReviewRow) -> rv.Review:
        review = rv.Review.FromString(row.review)
        review.review_id, review.node = review_id(row.tcn, row.node), row.node
        review.tcn = booking_of(row.tcn)[1]
        review.ori, review.state = row.ori, rv.ReviewState.ValueType(row.state)
        review.examiner, review.note = row.examiner, row.note
        review.opened_at.FromDatetime(_aware(row.opened_at))
        review.age_s = max(0.0, (_now() - _aware(row.opened_at)).total_seconds())
        if row.decided_at is not None:
            review.decided_at.FromDatetime(_aware(row.decided_at))
        return review

    def release_expired_claims(self, claim_s: float) -> int:
        """Returns every review claimed longer than ``claim_s`` ago to the queue (audited);
        returns how many. An examiner who walks away does not hold a case for ever."""
        cutoff = _now() - dt.timedelta(seconds=claim_s)
        with self._sessions.begin() as session:
            expired = session.execute(
                update(ReviewRow)
                .where(ReviewRow.state == rv.CLAIMED, ReviewRow.claimed_at < cutoff)
                .values(state=rv.OPEN, examiner="", claimed_at=None)
                .returning(ReviewRow.tcn, ReviewRow.node)
            ).all()
            for tcn, node in expired:
                self._append_audit(session, tcn, "review_claim_expired", f"{node} after {claim_s:.0f} s", b"")
            return len(expired)

    def reviews(
        self, states: Sequence[int], limit: int, *, overdue_s: float | None = None
    ) -> list[rv.Review]:
        """Reviews in ``states``, oldest first; with ``overdue_s``, only those opened longer ago."""
        with self._sessions() as session:
            query = select(ReviewRow).where(ReviewRow.state.in_(states))
            if overdue_s is not None:
                query = query.where(ReviewRow.opened_at < _now() - dt.timedelta(seconds=overdue_s))
            rows = session.scalars(query.order_by(ReviewRow.opened_at).limit(limit))
            return [self._review(r) for r in rows]

    def claim_review(self, tcn: str, node: str, examiner: str) -> tuple[rv.Review, bytes] | None:
        """Claims an open review for ``examiner`` (a claim of one's own is renewed); returns the
        review and the sealed booking, None when there is no such review. Raises
        :class:`ReviewConflict` when another examiner holds it or it is decided.

        One conditional write: of two examiners claiming at once, exactly one gets it."""
        now = _now()
        with self._sessions.begin() as session:
            claimed = _rows_changed(
                session.execute(
                    update(ReviewRow)
                    .where(
                        ReviewRow.tcn == tcn,
                        ReviewRow.node == node,
                        or_(
                            ReviewRow.state == rv.OPEN,
                            (ReviewRow.state == rv.CLAIMED) & (ReviewRow.examiner == examiner),
                        ),
                    )
                    .values(state=rv.CLAIMED, examiner=examiner, claimed_at=now)
                )
            )
            row = session.get(ReviewRow, (tcn, node))
            if row is None:
                return None
            if not claimed:
                if row.state == rv.CLAIMED:
                    raise ReviewConflict(f"review {review_id(tcn, node)} is claimed by {row.examiner}")
                raise ReviewConflict(f"review {review_id(tcn, node)} is already {_state_name(row.state)}")
            self._append_audit(session, tcn, "review_claimed", f"{node} by {examiner}", b"")
            return self._review(row), row.sealed

    def held_review(self, tcn: str, node: str, examiner: str) -> tuple[rv.Review, bytes] | None:
        """The review ``examiner`` holds a claim on, with its sealed booking; None when there is
        no such review. Raises :class:`ReviewConflict` when the examiner holds no claim on it."""
        with self._sessions() as session:
            row = session.get(ReviewRow, (tcn, node))
            if row is None:
                return None
            if row.state != rv.CLAIMED or row.examiner != examiner:
                raise ReviewConflict(_not_held(row))
            return self._review(row), row.sealed

    def decide_review(
        self, tcn: str, node: str, examiner: str, verdict: Verdict, note: str
    ) -> tuple[rv.Review, bk.BookingDecision | None]:
        """Records the examiner's verdict, atomically: the review closed and its sealed booking
        dropped; the stored decision updated as ``verdict`` says (:meth:`Verdict.apply`); its
        notice, if any, queued in the outbox; all of it audited. Raises
        :class:`ReviewConflict` unless ``examiner`` holds the claim; KeyError when no review.

        The review's state moves in one conditional write, taken first: of a confirmation and a
        rejection racing, one finds the claim and the other finds a decided review and changes
        nothing, so a notice exists if and only if the verdict that stands is a confirmation."""
        now = _now()
        confirmed = verdict.verdict == rv.CONFIRM
        with self._sessions.begin() as session:
            moved = _rows_changed(
                session.execute(
                    update(ReviewRow)
                    .where(
                        ReviewRow.tcn == tcn,
                        ReviewRow.node == node,
                        ReviewRow.state == rv.CLAIMED,
                        ReviewRow.examiner == examiner,
                    )
                    .values(
                        state=rv.CONFIRMED if confirmed else rv.REJECTED,
                        decided_at=now,
                        note=note,
                        sealed=b"",
                    )
                )
            )
            row = session.get(ReviewRow, (tcn, node))
            if row is None:
                raise KeyError(review_id(tcn, node))
            if not moved:
                raise ReviewConflict(_not_held(row))
            # Locked: the booking's other review may be decided at the same moment, and each
            # verdict changes the decision the other read.
            stored = session.get(DecisionRow, tcn, with_for_update=True)
            decision: bk.BookingDecision | None = None
            if stored is not None:
                decision = bk.BookingDecision.FromString(stored.decision)
                verdict.apply(decision, node)
                stored.decision, stored.updated_at = decision.SerializeToString(), now
            if verdict.notification is not None and session.get(OutboxRow, tcn) is None:
                session.add(_outbox_row(tcn, verdict.notification, now))
            event = "review_confirmed" if confirmed else "review_rejected"
            outcome = (
                "unchanged"
                if verdict.notification_state is None
                else bk.NotificationState.Name(verdict.notification_state)
            )
            self._append_audit(
                session,
                tcn,
                event,
                f"{node} by {examiner}, notification {outcome}: {note}",
                self._state(session, tcn),
            )
            return self._review(row), decision

    def review_counts(self, overdue_s: float) -> tuple[int, int, float]:
        """(reviews waiting for a verdict, of which opened more than ``overdue_s`` ago, age in
        seconds of the oldest waiting)."""
        waiting = ReviewRow.state.in_([rv.OPEN, rv.CLAIMED])
        with self._sessions() as session:
            count = session.scalar(select(func.count()).select_from(ReviewRow).where(waiting)) or 0
            overdue = (
                session.scalar(
                    select(func.count())
                    .select_from(ReviewRow)
                    .where(waiting, ReviewRow.opened_at < _now() - dt.timedelta(seconds=overdue_s))
                )
                or 0
            )
            oldest = session.scalar(select(func.min(ReviewRow.opened_at)).where(waiting))
            age = 0.0 if oldest is None else max(0.0, (_now() - _aware(oldest)).total_seconds())
            return count, overdue, age

    # ------------------------------------------------------------------ statistics

    def stats(self, review_overdue_s: float = 4 * 3600.0) -> bk.CoordinatorStats:
        """Counts of decisions, retried bookings, the outbox and its dead letters, and the reviews
        waiting for a verdict (overdue: opened more than ``review_overdue_s`` ago)."""
        reviews, overdue, oldest_review_s = self.review_counts(review_overdue_s)
        with self._sessions() as session:
            oldest = session.scalar(
                select(func.min(OutboxRow.created_at)).where(OutboxRow.delivered_at.is_(None))
            )
            return bk.CoordinatorStats(
                decisions=session.scalar(select(func.count()).select_from(DecisionRow)) or 0,
                incomplete=session.scalar(
                    select(func.count()).select_from(DecisionRow).where(DecisionRow.status == bk.INCOMPLETE)
                )
                or 0,
                retrying_bookings=session.scalar(select(func.count()).select_from(PendingBookingRow)) or 0,
                outbox_pending=session.scalar(
                    select(func.count()).select_from(OutboxRow).where(OutboxRow.delivered_at.is_(None))
                )
                or 0,
                oldest_pending_notification_age_s=(
                    0.0 if oldest is None else max(0.0, (_now() - _aware(oldest)).total_seconds())
                ),
                dead_letters=session.scalar(select(func.count()).select_from(DeadLetterRow)) or 0,
                open_reviews=reviews,
                overdue_reviews=overdue,
                oldest_open_review_age_s=oldest_review_s,
            )

    def close(self) -> None:
        self._engine.dispose()
