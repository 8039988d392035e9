"""``fedprint.ice.v1.IceNotificationService``: stores notifications once per TCN and
lists them by threat level, then by time received."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from sqlalchemy import DateTime, Integer, LargeBinary, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from fedprint.database import connect
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.migrations import Migrations, upgrade
from fedprint.private import private_directory
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import InvalidRequest, ServiceHost, abort_invalid, service
from fedprint.validation import (
    ORI,
    SUBJECT_ID,
    TCN,
    Violations,
    booking_key,
    check_charges,
    check_count,
    check_text,
    check_timestamp,
)
from ice_service.config import IceConfig

log = structlog.get_logger(__name__)
MAX_LIST = 1000
#: Reasons a notification may carry (a decision has a handful).
MAX_REASONS = 50
_LEVELS = frozenset({rec.LEVEL_1, rec.LEVEL_2, rec.LEVEL_3})


def check_notification(n: ice.Notification) -> Violations:
    """What must hold of a notification before it is stored."""
    violations = Violations()
    TCN.check(n.tcn, "tcn", violations)
    ORI.check(n.ori, "ori", violations)
    if n.level not in _LEVELS:
        violations.add("level", "threat level must be LEVEL_1, LEVEL_2 or LEVEL_3")
    if n.HasField("booking_time"):
        check_timestamp(n.booking_time, "booking_time", violations)
    check_charges(n.charges, "charges", violations)
    if not n.ident_match.subject_id:
        violations.add("ident_match.subject_id", "the matched IDENT subject is required")
    else:
        SUBJECT_ID.check(n.ident_match.subject_id, "ident_match.subject_id", violations)
    if n.HasField("iafis_match"):
        SUBJECT_ID.check(n.iafis_match.subject_id, "iafis_match.subject_id", violations)
    check_text(n.policy_version, "policy_version", violations, limit=64)
    if check_count(len(n.reasons), MAX_REASONS, "reasons", violations, "reasons"):
        for i, reason in enumerate(n.reasons):
            check_text(reason, f"reasons[{i}]", violations, limit=500)
    return violations


def _utc(t: dt.datetime) -> dt.datetime:
    """A stored time in UTC: SQLite returns it naive (it was written in UTC), PostgreSQL aware."""
    return t.astimezone(dt.UTC) if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


class _Base(DeclarativeBase):
    pass


class NotificationRow(_Base):
    __tablename__ = "notifications"
    #: The booking's key, ORI/TCN (fedprint.validation.booking_key): a TCN is its agency's own.
    tcn: Mapped[str] = mapped_column(String(64), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, index=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    notification: Mapped[bytes] = mapped_column(LargeBinary)


#: The ICE store's schema history (``ice_service/migrations``).
MIGRATIONS = Migrations(
    name="ice",
    versions=Path(__file__).with_name("migrations"),
    metadata=_Base.metadata,
    baseline="0001",
    baseline_table="notifications",
)


class IceStore:
    """Received notifications (SQLite by default, PostgreSQL by URL)."""

    def __init__(self, url: str) -> None:
        self._engine = connect(url)
        upgrade(self._engine, [MIGRATIONS])
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def add(self, notification: ice.Notification) -> tuple[bool, dt.datetime]:
        """Stores a notification, once per booking (ORI and TCN); returns (duplicate, when first
        received)."""
        now = dt.datetime.now(dt.UTC)
        key = booking_key(notification.ori, notification.tcn)
        try:
            with self._sessions.begin() as session:
                session.add(
                    NotificationRow(
                        tcn=key,
                        level=int(notification.level),
                        received_at=now,
                        notification=notification.SerializeToString(),
                    )
                )
            return False, now
        except IntegrityError:
            with self._sessions() as session:
                row = session.get(NotificationRow, key)
                assert row is not None
                return True, _utc(row.received_at)

    def list(self, limit: int, level: int = 0) -> list[tuple[ice.Notification, dt.datetime]]:
        with self._sessions() as session:
            query = select(NotificationRow).order_by(NotificationRow.level, NotificationRow.received_at)
            if level:
                query = query.where(NotificationRow.level == level)
            rows = session.scalars(query.limit(limit))
            return [(ice.Notification.FromString(r.notification), _utc(r.received_at)) for r in rows]

    def close(self) -> None:
        self._engine.dispose()


class IceNotificationServer(ice_grpc.IceNotificationServiceServicer):
    """Notify and ListNotifications."""

    def __init__(self, store: IceStore) -> None:
        self.store = store

    async def Notify(self, request: ice.Notification, context: grpc.aio.ServicerContext[Any, Any]) -> ice.Ack:
        violations = check_notification(request)
        if violations:
            await abort_invalid(context, InvalidRequest(violations, "malformed notification"))
        duplicate, received_at = await asyncio.to_thread(self.store.add, request)
        log.info("notification received", tcn=request.tcn, level=request.level, duplicate=duplicate)
        ack = ice.Ack(tcn=request.tcn, duplicate=duplicate)
        ack.received_at.FromDatetime(received_at)
        return ack

    async def ListNotifications(
        self, request: ice.ListNotificationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ice.ListNotificationsResponse:
        if request.level and request.level not in _LEVELS:
            violations = Violations()
            violations.add("level", "level must be unset, LEVEL_1, LEVEL_2 or LEVEL_3")
            await abort_invalid(context, InvalidRequest(violations, "malformed request"))
        limit = min(request.limit or 100, MAX_LIST)
        rows = await asyncio.to_thread(self.store.list, limit, int(request.level))
        response = ice.ListNotificationsResponse()
        for notification, received_at in rows:
            item = response.notifications.add(notification=notification)
            item.received_at.FromDatetime(received_at)
        return response


@dataclass
class IceService:
    """A running ICE notification service."""

    host: ServiceHost
    server: IceNotificationServer

    async def start(self) -> int:
        """Starts serving; returns the bound port."""
        return await self.host.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.host.stop(grace_s)
        self.server.store.close()


def build_ice(config: IceConfig, database_url: str | None = None) -> IceService:
    """The ICE notification server over its store (not yet started)."""
    private_directory(config.data_dir)
    server = IceNotificationServer(IceStore(database_url or f"sqlite:///{config.data_dir / 'ice.sqlite'}"))
    host = ServiceHost(
        config.listen,
        [
            service(
                ice.DESCRIPTOR.services_by_name["IceNotificationService"],
                ice_grpc.add_IceNotificationServiceServicer_to_server,
                server,
            )
        ],
        config.tls,
        insecure=config.insecure,
        denials=config.refusals.ledger(),
        metrics_listen=config.metrics_listen,
        health_listen=config.health_listen,
    )
    return IceService(host, server)
