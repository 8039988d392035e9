"""The shape every background task of the coordinator shares: do what is due, then sleep until
the next thing falls due or someone wakes the task, and never die of one bad pass."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter, capped at ``max_s``."""
    return random.uniform(0.5, 1.0) * min(max_s, initial_s * 2.0**attempts)


class DueWorkLoop:
    """Runs ``work`` whenever something is due (``next_due``) or :meth:`wake` is called."""

    def __init__(
        self,
        name: str,
        work: Callable[[], Awaitable[object]],
        next_due: Callable[[], dt.datetime | None],
        *,
        idle_s: float,
    ) -> None:
        self._name = name
        self._work = work
        self._next_due = next_due
        self._idle_s = idle_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    def wake(self) -> None:
        """Something new is due now: look at once rather than at the next due time."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._work()
                next_due = await asyncio.to_thread(self._next_due)
            except Exception:  # a database hiccup must not end the task for good
                log.exception("background pass failed", task=self._name)
                next_due = None
            wait = self._idle_s
            if next_due is not None:
                wait = max(0.05, (next_due - dt.datetime.now(dt.UTC)).total_seconds())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(wait, self._idle_s))
