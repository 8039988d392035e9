"""The coordinator's durable state: latest decision per TCN, the append-only audit
log, and the notification outbox, in one database so that a decision and its
notification are committed together or not at all.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import DateTime, Integer, LargeBinary, String, Text, event, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.database import connect
from fedprint.ice.v1 import ice_pb2 as ice


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


class AuditRow(_Base):
    """Append-only: a trigger refuses updates and deletes (SQLite)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    tcn: Mapped[str] = mapped_column(String(64), index=True)
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class OutboxRow(_Base):
    __tablename__ = "outbox"
    tcn: Mapped[str] = mapped_column(String(64), primary_key=True)
    notification: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")


@event.listens_for(AuditRow.__table__, "after_create")
def _append_only(target: object, connection: Connection, **kw: object) -> None:
    if connection.dialect.name == "sqlite":
        for op in ("UPDATE", "DELETE"):
            connection.exec_driver_sql(
                f"CREATE TRIGGER audit_log_no_{op.lower()} BEFORE {op} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
            )


@dataclass(frozen=True)
class PendingNotification:
    tcn: str
    notification: ice.Notification
    attempts: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; everything stored here is UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


class CoordinatorStore:
    """Decisions, audit log and outbox of the coordinator."""

    def __init__(self, url: str) -> None:
        self._engine = connect(url)
        _Base.metadata.create_all(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def decision(self, tcn: str) -> bk.BookingDecision | None:
        with self._sessions() as session:
            row = session.get(DecisionRow, tcn)
            return None if row is None else bk.BookingDecision.FromString(row.decision)

    def record_decision(self, decision: bk.BookingDecision, notification: ice.Notification | None) -> None:
        """Stores the decision, appends it to the audit log and queues the notification, atomically."""
        now = _now()
        payload = decision.SerializeToString()
        with self._sessions.begin() as session:
            row = session.get(DecisionRow, decision.tcn)
            if row is None:
                session.add(
                    DecisionRow(
                        tcn=decision.tcn,
                        ori=decision.ori,
                        status=decision.status,
                        attempt=decision.attempt,
                        decision=payload,
                        updated_at=now,
                    )
                )
            else:
                row.status, row.attempt, row.decision, row.updated_at = (
                    decision.status,
                    decision.attempt,
                    payload,
                    now,
                )
            session.add(
                AuditRow(
                    recorded_at=now,
                    tcn=decision.tcn,
                    event="decision",
                    detail="; ".join(decision.reasons),
                    payload=payload,
                )
            )
            if notification is not None and session.get(OutboxRow, decision.tcn) is None:
                session.add(
                    OutboxRow(
                        tcn=decision.tcn,
                        notification=notification.SerializeToString(),
                        created_at=now,
                        attempts=0,
                        next_attempt_at=now,
                        last_error="",
                    )
                )

    def record_denial(self, tcn: str, detail: str) -> None:
        """Appends a refused call to the audit log (``tcn`` empty when the call named no booking)."""
        with self._sessions.begin() as session:
            session.add(
                AuditRow(recorded_at=_now(), tcn=tcn, event="access_denied", detail=detail, payload=b"")
            )

    def due_notifications(self, limit: int = 64) -> list[PendingNotification]:
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

    def next_due_at(self) -> dt.datetime | None:
        with self._sessions() as session:
            due = session.scalar(
                select(OutboxRow.next_attempt_at)
                .where(OutboxRow.delivered_at.is_(None))
                .order_by(OutboxRow.next_attempt_at)
                .limit(1)
            )
            return None if due is None else _aware(due)

    def mark_delivered(self, tcn: str, duplicate: bool) -> None:
        """Closes the outbox entry and moves the stored decision to DELIVERED."""
        now = _now()
        with self._sessions.begin() as session:
            session.execute(update(OutboxRow).where(OutboxRow.tcn == tcn).values(delivered_at=now))
            row = session.get(DecisionRow, tcn)
            if row is not None:
                decision = bk.BookingDecision.FromString(row.decision)
                decision.notification = bk.DELIVERED
                row.decision = decision.SerializeToString()
            session.add(
                AuditRow(
                    recorded_at=now,
                    tcn=tcn,
                    event="notification_delivered",
                    detail="acknowledged (already received)" if duplicate else "acknowledged",
                    payload=b"",
                )
            )

    def mark_failed(self, tcn: str, error: str, retry_at: dt.datetime) -> None:
        with self._sessions.begin() as session:
            row = session.get(OutboxRow, tcn)
            if row is not None:
                row.attempts += 1
                row.last_error = error
                row.next_attempt_at = retry_at

    def outbox_attempts(self, tcn: str) -> tuple[int, bool] | None:
        """(attempts, delivered) of a TCN's outbox entry, None when it has none."""
        with self._sessions() as session:
            row = session.get(OutboxRow, tcn)
            return None if row is None else (row.attempts, row.delivered_at is not None)

    def audit(self, tcn: str) -> list[tuple[str, str]]:
        """(event, detail) of a TCN's audit entries, oldest first."""
        with self._sessions() as session:
            rows = session.execute(
                select(AuditRow.event, AuditRow.detail).where(AuditRow.tcn == tcn).order_by(AuditRow.id)
            )
            return [(e, d) for e, d in rows]

    def close(self) -> None:
        self._engine.dispose()
