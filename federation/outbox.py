"""Delivers queued ICE notifications: at least once, idempotent by TCN on the
receiving side, retried with exponential backoff, surviving restarts (the queue
is the coordinator's database, not memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random

import grpc
import structlog

from federation.store import CoordinatorStore
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc

log = structlog.get_logger(__name__)


class OutboxDeliverer:
    """Background task that empties the outbox into the ICE notification service."""

    def __init__(
        self,
        store: CoordinatorStore,
        ice: ice_grpc.IceNotificationServiceAsyncStub,
        *,
        deadline_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self._store = store
        self._ice = ice
        self._deadline_s = deadline_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    def wake(self) -> None:
        """Something was queued: look now rather than at the next retry time."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def backoff_s(self, attempts: int) -> float:
        """Exponential backoff with full jitter, capped."""
        return random.uniform(0.5, 1.0) * min(self._retry_max_s, self._retry_initial_s * 2.0**attempts)

    async def deliver_due(self) -> int:
        """One pass over the due entries; returns how many were delivered."""
        delivered = 0
        for pending in await asyncio.to_thread(self._store.due_notifications):
            try:
                ack = await self._ice.Notify(pending.notification, timeout=self._deadline_s)
            except grpc.aio.AioRpcError as error:
                retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.backoff_s(pending.attempts))
                await asyncio.to_thread(
                    self._store.mark_failed, pending.tcn, f"{error.code().name}: {error.details()}", retry_at
                )
                log.warning(
                    "notification not delivered",
                    tcn=pending.tcn,
                    attempts=pending.attempts + 1,
                    code=error.code().name,
                    retry_at=retry_at.isoformat(),
                )
                continue
            await asyncio.to_thread(self._store.mark_delivered, pending.tcn, ack.duplicate)
            delivered += 1
            log.info("notification delivered", tcn=pending.tcn, duplicate=ack.duplicate)
        self.delivered += delivered
        return delivered

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.deliver_due()
            except Exception:  # a database hiccup must not end delivery for good
                log.exception("outbox pass failed")
            next_due = await asyncio.to_thread(self._store.next_due_at)
            wait = self._retry_max_s
            if next_due is not None:
                wait = max(0.05, (next_due - dt.datetime.now(dt.UTC)).total_seconds())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(wait, self._retry_max_s))
