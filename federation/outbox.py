"""Delivers queued ICE notifications: at least once, idempotent by TCN on the
receiving side, retried with exponential backoff, surviving restarts (the queue
is the coordinator's database, not memory). A notification that fails ``max_attempts``
times becomes a dead letter that an operator retries (`fedprint outbox retry`). A notice leaves
the outbox once ICE acknowledges it (the row keeps its TCN, level and digest), and a dead letter's
once it is older than the retention (``dead_letter_retention_s``). Replicas of the
coordinator share the outbox: each claims the entries it sends
(:meth:`~federation.store.CoordinatorStore.claim_due_notifications`), so no entry goes out from
two replicas at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import grpc
import structlog

from federation.background import DueWorkLoop, backoff_s
from federation.store import CoordinatorStore
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc

log = structlog.get_logger(__name__)

#: Entries one pass claims: small, so a replica that dies holds few, and not for long.
CLAIM_BATCH = 16
#: Slack on top of the time a pass may take (a deadline per entry) before its claims run out.
CLAIM_SLACK_S = 30.0
#: The longest between two purges of notices that outlived their purpose.
PURGE_EVERY_S = 60.0
#: How long a dead letter keeps its notice for an operator's retry, unless configured.
DEAD_LETTER_RETENTION_S = 30 * 24 * 3600.0


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
        max_attempts: int,
        dead_letter_retention_s: float = DEAD_LETTER_RETENTION_S,
    ) -> None:
        self._store = store
        self._ice = ice
        self._deadline_s = deadline_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._max_attempts = max_attempts
        self._dead_letter_retention_s = dead_letter_retention_s
        self._purged_at = float("-inf")
        self._loop = DueWorkLoop("outbox", self.deliver_due, store.next_due_at, idle_s=retry_max_s)
        self.delivered = 0

    def start(self) -> None:
        self._loop.start()

    def wake(self) -> None:
        """Something was queued: look now rather than at the next retry time."""
        self._loop.wake()

    async def stop(self) -> None:
        await self._loop.stop()

    def backoff_s(self, attempts: int) -> float:
        """Exponential backoff with full jitter, capped."""
        return backoff_s(attempts, self._retry_initial_s, self._retry_max_s)

    async def deliver_due(self) -> int:
        """One pass over the due entries; returns how many were delivered. Purges the notices
        past their purpose first, at most every minute (or every retention, if shorter)."""
        if time.monotonic() - self._purged_at >= min(PURGE_EVERY_S, self._dead_letter_retention_s):
            self._purged_at = time.monotonic()
            purged = await asyncio.to_thread(self._store.purge_notices, self._dead_letter_retention_s)
            if purged:
                log.info("notices purged", notices=purged)
        delivered = 0
        # The claim outlasts the pass: every entry may use its whole deadline.
        lease_s = self._deadline_s * CLAIM_BATCH + CLAIM_SLACK_S
        claimed = await asyncio.to_thread(self._store.claim_due_notifications, lease_s, CLAIM_BATCH)
        for pending in claimed:
            try:
                ack = await self._ice.Notify(pending.notification, timeout=self._deadline_s)
            except grpc.aio.AioRpcError as error:
                retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.backoff_s(pending.attempts))
                reason = f"{error.code().name}: {error.details()}"
                dead = await asyncio.to_thread(
                    self._store.mark_failed, pending.tcn, reason, retry_at, self._max_attempts
                )
                if dead:
                    log.error(
                        "notification dead-lettered",
                        tcn=pending.tcn,
                        attempts=pending.attempts + 1,
                        code=reason,
                    )
                else:
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
