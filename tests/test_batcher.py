"""Dynamic micro-batching: concurrent submissions share one call, within the size and wait limits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from nodes.gallery.batcher import MicroBatcher


async def test_concurrent_items_share_one_batch_and_keep_their_order() -> None:
    calls: list[list[int]] = []

    def square(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        return [i * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(square, max_batch=8, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    await batcher.close()
    assert results == [0, 1, 4, 9, 16]
    assert calls == [[0, 1, 2, 3, 4]]
    assert batcher.stats.batches == 1 and batcher.stats.largest == 5


async def test_batches_never_exceed_the_size_limit() -> None:
    sizes: list[int] = []

    def echo(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(echo, max_batch=3, max_wait_s=0.05)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == list(range(10))
    await batcher.close()
    assert max(sizes) <= 3 and sum(sizes) == 10


async def test_a_lone_item_waits_no_longer_than_the_wait_limit() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: list(items), max_batch=100, max_wait_s=0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await batcher.submit(42) == 42
    await batcher.close()
    assert loop.time() - started < 1.0


async def test_a_failing_batch_fails_every_caller_in_it_and_the_batcher_survives() -> None:
    def explode(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("device error")
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(explode, max_batch=4, max_wait_s=0.05)
    outcomes = await asyncio.gather(batcher.submit(13), batcher.submit(1), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert await batcher.submit(2) == 2
    await batcher.close()


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: list(items), max_batch=0, max_wait_s=0.0)
