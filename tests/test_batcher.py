"""Dynamic micro-batching: concurrent submissions share one call, within the size and wait limits;
the queue is bounded, and an item that fails fails only its own caller. In-process, then through a
real gallery node on loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from fedprint.access import retry_delay
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles
from fedprint.rpc import open_channel
from nodes.gallery import GalleryNode
from nodes.gallery.batcher import MicroBatcher, QueueFull
from nodes.gallery.config import BatchingConfig, NodeConfig
from nodes.iafis import build_node
from synthetic.population import Population
from tests.waiting import eventually


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


async def test_an_item_that_fails_fails_only_its_own_caller() -> None:
    calls: list[list[int]] = []

    def explode(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise RuntimeError("device error")
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(explode, max_batch=4, max_wait_s=0.05)
    outcomes = await asyncio.gather(
        batcher.submit(1), batcher.submit(13), batcher.submit(2), return_exceptions=True
    )
    assert outcomes[0] == 1 and outcomes[2] == 2
    assert isinstance(outcomes[1], RuntimeError)
    # The batch failed as a whole, then each item ran alone.
    assert calls == [[1, 13, 2], [1], [13], [2]] and batcher.stats.split == 1
    assert await batcher.submit(3) == 3
    await batcher.close()


async def test_a_full_queue_refuses_at_once_and_queues_nothing_of_a_call_that_does_not_fit() -> None:
    busy, release = threading.Event(), threading.Event()

    def held(items: Sequence[int]) -> list[int]:
        busy.set()
        release.wait(timeout=10)
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(held, max_batch=1, max_wait_s=0.0, max_queue=2)
    first = asyncio.ensure_future(batcher.submit(0))
    await eventually(busy.is_set)  # the worker holds item 0 (max_batch 1: no more)
    waiting = asyncio.ensure_future(batcher.submit_all([1, 2]))
    await asyncio.sleep(0)
    assert batcher.queue_depth == 2
    with pytest.raises(QueueFull) as full:
        await batcher.submit(3)
    assert (full.value.queued, full.value.limit, full.value.wanted) == (2, 2, 1)
    assert full.value.retry_after_s >= 0.0
    with pytest.raises(QueueFull):
        await batcher.submit_all([4, 5])
    assert batcher.queue_depth == 2 and batcher.stats.refused == 3
    release.set()
    assert await first == 0 and await waiting == [1, 2]
    assert await batcher.submit(6) == 6  # room again once the queue drained
    await batcher.close()


def test_batch_size_and_queue_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: list(items), max_batch=0, max_wait_s=0.0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: list(items), max_batch=1, max_wait_s=0.0, max_queue=0)


# --------------------------------------------------------------------------- through a real node


@pytest_asyncio.fixture
async def node(tmp_path: Path, pki: dict[str, TlsFiles]) -> AsyncIterator[GalleryNode]:
    """An IAFIS node on loopback whose batcher takes one probe at a time and queues two."""
    config = NodeConfig(
        node="iafis",
        data_dir=tmp_path,
        tls=pki["iafis"],
        batching=BatchingConfig(max_batch=1, max_wait_ms=0.0, max_queue=2),
        max_probes_per_request=2,
    )
    node = build_node(config)
    await node.start()
    try:
        yield node
    finally:
        await node.stop(0)


def probes(population: Population, n: int, fingers: int = 10) -> list[gal.Probe]:
    tenprints = [b.booking.tenprint for b in population.bookings[:n]]
    return [
        gal.Probe(probe_id=f"P-{i}", tenprint=bio.TenPrint(fingers=t.fingers[:fingers]))
        for i, t in enumerate(tenprints)
    ]


async def test_a_node_with_a_full_queue_answers_resource_exhausted_with_a_retry_delay(
    node: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    batcher = node.servicer.batcher
    search, busy, release = batcher._run_batch, threading.Event(), threading.Event()

    def held(items: Sequence[Any]) -> Sequence[Any]:  # the device is busy until released
        busy.set()
        release.wait(timeout=30)
        return search(items)

    batcher._run_batch = held
    one, two, three = probes(population, 3)
    async with open_channel(node.host.address, pki["coordinator"], retries=False) as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        first = asyncio.ensure_future(stub.Identify(gal.IdentifyRequest(probes=[one]), timeout=60))
        await eventually(busy.is_set)  # the worker holds `one`
        second = asyncio.ensure_future(stub.Identify(gal.IdentifyRequest(probes=[two, three]), timeout=60))
        await eventually(lambda: batcher.queue_depth == 2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Identify(gal.IdentifyRequest(probes=[three]), timeout=60)
        error = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 of 2" in (error.details() or "")
        delay = retry_delay(error)
        assert delay is not None and delay >= 0.0
        release.set()
        answered = [await first, await second]
    assert [len(r.results) for r in answered] == [1, 2]
    assert batcher.stats.refused == 1


async def test_a_probe_whose_search_fails_fails_only_its_own_call(
    node: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    batcher = node.servicer.batcher
    batcher.max_batch = 4
    batcher.max_wait_s = 0.2  # the three calls below share one batch
    batcher.max_queue = 4  # and all three may wait for it, however late the worker starts
    search = batcher._run_batch

    def faulty(items: Sequence[Any]) -> Sequence[Any]:  # a device fault on one-finger probes
        if any(len(item.tenprint.fingers) == 1 for item in items):
            raise RuntimeError("device fault")
        return search(items)

    batcher._run_batch = faulty
    good, other = probes(population, 2)
    (bad,) = probes(population, 1, fingers=1)
    async with open_channel(node.host.address, pki["coordinator"], retries=False) as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        outcomes = await asyncio.gather(
            *(stub.Identify(gal.IdentifyRequest(probes=[p]), timeout=60) for p in (good, bad, other)),
            return_exceptions=True,
        )
    assert isinstance(outcomes[0], gal.IdentifyResponse) and isinstance(outcomes[2], gal.IdentifyResponse)
    assert isinstance(outcomes[1], grpc.aio.AioRpcError)
    assert outcomes[1].code() == grpc.StatusCode.UNKNOWN
    # One batch of the three failed; then each probe ran alone and two were answered.
    assert batcher.stats.split == 1 and batcher.stats.batches == 2
