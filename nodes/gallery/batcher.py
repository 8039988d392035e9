"""Dynamic micro-batching: concurrent requests share one device call.

Requests queue up; a single worker takes whatever is waiting, waits at most
``max_wait_s`` for more (up to ``max_batch`` items), and runs the batch function
once, off the event loop. Under load batches fill up (throughput); when idle a
lone request waits at most ``max_wait_s`` (latency).

The queue is bounded (``max_queue``): past it a submission is refused at once with
:class:`QueueFull`, which the server answers RESOURCE_EXHAUSTED, rather than queued behind work
that could not finish within any caller's deadline. A batch whose call raises is run again item
by item, so an item that cannot be processed fails only its own caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class BatchStats:
    """Counters for GetStats and the benchmark."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    busy_s: float = 0.0
    #: Items refused because the queue was full.
    refused: int = 0
    #: Batches whose call raised and that were run again item by item.
    split: int = 0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class QueueFull(Exception):
    """The batcher's queue has no room for a submission: ``wanted`` items, ``queued`` of
    ``limit`` places taken; ``retry_after_s`` estimates when the queue will have drained."""

    def __init__(self, wanted: int, queued: int, limit: int, retry_after_s: float) -> None:
        super().__init__(f"{queued} of {limit} queue places taken; {wanted} more do not fit")
        self.wanted = wanted
        self.queued = queued
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher(Generic[In, Out]):
    """Gathers items submitted concurrently into calls of ``run_batch`` (list in, list out, same order);
    at most ``max_queue`` items wait for a batch."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int = 128,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        #: Called after each batch with its size and device seconds (metrics hook).
        self.on_batch: Callable[[int, float], None] | None = None
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue(maxsize=max_queue)
        self._worker: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Items waiting for the next batch."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")

    async def close(self) -> None:
        """Stops the worker; items still queued fail with CancelledError."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()

    async def submit(self, item: In) -> Out:
        """Queues ``item`` and waits for its result (or its exception); :class:`QueueFull` at once
        when the queue is full."""
        return (await self.submit_all([item]))[0]

    async def submit_all(self, items: Sequence[In]) -> list[Out]:
        """Queues all ``items`` or, when the queue lacks room for all of them, none
        (:class:`QueueFull`), and waits for their results in order; the first item that fails
        raises its exception (the others' results are then dropped)."""
        self.start()
        queued = self._queue.qsize()
        if queued + len(items) > self.max_queue:
            self.stats.refused += len(items)
            raise QueueFull(len(items), queued, self.max_queue, self._drain_estimate(queued))
        pending: list[_Pending[In, Out]] = [_Pending(item) for item in items]
        for p in pending:
            self._queue.put_nowait(p)  # room checked above, and nothing else runs in between
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _drain_estimate(self, queued: int) -> float:
        """Seconds the queued items will take, at the mean device time per batch so far (or the
        wait limit before the first batch)."""
        per_batch = self.stats.busy_s / self.stats.batches if self.stats.batches else self.max_wait_s
        return max(self.max_wait_s, math.ceil(queued / self.max_batch) * per_batch)

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            # Callers that gave up (deadline exceeded) need no work.
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            error = await self._run(batch)
            if error is None:
                continue
            if len(batch) == 1:
                _fail(batch[0], error)
                continue
            # Which item made the call fail is unknown: each runs alone, so only its own caller
            # sees the failure, and the others get their results.
            self.stats.split += 1
            for p in batch:
                if not p.future.done():
                    failed = await self._run([p])
                    if failed is not None:
                        _fail(p, failed)

    async def _run(self, batch: list[_Pending[In, Out]]) -> Exception | None:
        """One call of ``run_batch``; sets the results, or returns the call's exception."""
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self._run_batch, [p.item for p in batch])
        except Exception as error:
            return error
        finally:
            elapsed = time.perf_counter() - started
            self.stats.busy_s += elapsed
            if self.on_batch is not None:
                self.on_batch(len(batch), elapsed)
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
        return None


def _fail(pending: _Pending[In, Out], error: Exception) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
