"""Waiting for events in tests: poll what another task, thread or process is doing until it
holds, within a deadline generous enough for a loaded machine. Never a fixed sleep before an
assertion: a slow machine then only takes longer, and a broken one still fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Long enough for anything a test waits on to happen on a machine whose cores are all busy.
DEADLINE_S = 60.0


def _holds(value: Any) -> bool:
    return bool(value)


class _Poll:
    """The deadline and a backoff from 10 ms to 200 ms between looks."""

    def __init__(self, timeout_s: float, what: str) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s, self.what = timeout_s, what
        self.interval = 0.01

    def next_interval(self, last: object) -> float:
        if time.monotonic() > self.deadline:
            raise AssertionError(f"{self.what} did not hold within {self.timeout_s:.0f} s (last: {last!r})")
        interval, self.interval = self.interval, min(self.interval * 2, 0.2)
        return interval


async def eventually(
    probe: Callable[[], T],
    holds: Callable[[T], bool] = _holds,
    *,
    timeout_s: float = DEADLINE_S,
    what: str = "the condition",
) -> T:
    """Calls ``probe`` until ``holds(value)`` and returns that value; fails naming ``what`` and the
    last value seen once ``timeout_s`` has passed. The event loop runs between looks."""
    poll = _Poll(timeout_s, what)
    while True:  # a poll: what is awaited happens in another thread, process or database
        if holds(value := probe()):
            return value
        await asyncio.sleep(poll.next_interval(value))


async def eventually_awaited(
    probe: Callable[[], Awaitable[T]],
    holds: Callable[[T], bool] = _holds,
    *,
    timeout_s: float = DEADLINE_S,
    what: str = "the condition",
) -> T:
    """:func:`eventually` for a probe that is a coroutine function (a gRPC call, say)."""
    poll = _Poll(timeout_s, what)
    while True:
        if holds(value := await probe()):
            return value
        await asyncio.sleep(poll.next_interval(value))


def eventually_blocking(
    probe: Callable[[], T],
    holds: Callable[[T], bool] = _holds,
    *,
    timeout_s: float = DEADLINE_S,
    what: str = "the condition",
) -> T:
    """:func:`eventually` outside an event loop (waiting on a subprocess or a thread)."""
    poll = _Poll(timeout_s, what)
    while not holds(value := probe()):
        time.sleep(poll.next_interval(value))
    return value
