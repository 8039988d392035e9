"""Dynamic micro-batching: concurrent requests share one device call.

Requests queue up; a single worker takes whatever is waiting, waits at most
``max_wait_s`` for more (up to ``max_batch`` items), and runs the batch function
once, off the event loop. Under load batches fill up (throughput); when idle a
lone request waits at most ``max_wait_s`` (latency).
"""

from __future__ import annotations

import asyncio
import contextlib
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

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher(Generic[In, Out]):
    """Gathers items submitted concurrently into calls of ``run_batch`` (list in, list out, same order)."""

    def __init__(
        self, run_batch: Callable[[Sequence[In]], Sequence[Out]], *, max_batch: int, max_wait_s: float
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        #: Called after each batch with its size and device seconds (metrics hook).
        self.on_batch: Callable[[int, float], None] | None = None
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue()
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
        """Queues ``item`` and waits for its result (or the batch's exception)."""
        self.start()
        pending: _Pending[In, Out] = _Pending(item)
        await self._queue.put(pending)
        return await pending.future

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
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._run_batch, [p.item for p in batch])
            except Exception as error:  # the whole batch failed: every caller sees why
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(error)
                continue
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
