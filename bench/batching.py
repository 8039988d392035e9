"""``fedprint bench batching``: what dynamic micro-batching buys one gallery node.

One real node (loopback gRPC, its own SQLite store) is enrolled once, then restarted from its
database under each batching setting and sent the same concurrent single-probe ``Identify``
calls. Throughput and latency percentiles of every setting come from the same run, so their
ratios hold on a noisy machine even where the absolute figures do not.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedprint.clients import enroll
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles, issue_dev_pki
from fedprint.rpc import open_channel
from nodes.gallery.config import BatchingConfig, NodeConfig, ShortlistConfig
from nodes.iafis import build_node
from synthetic.population import generate_population


@dataclass(frozen=True)
class BatchingBenchConfig:
    """The load and the settings compared; ``max_batch=1`` is the unbatched baseline."""

    persons: int = 200
    requests: int = 64
    concurrency: int = 16
    settings: tuple[BatchingConfig, ...] = field(
        default_factory=lambda: (
            BatchingConfig(max_batch=1, max_wait_ms=0.0),
            BatchingConfig(max_batch=4, max_wait_ms=5.0),
            BatchingConfig(max_batch=16, max_wait_ms=5.0),
        )
    )
    seed: int = 5
    torch_threads: int | None = None
    #: The node's search tiers; a ``min_gallery`` below the gallery size sends every probe
    #: through the shortlist (faiss, then full MCC of ``candidates`` subjects per probe).
    shortlist: ShortlistConfig = field(default_factory=ShortlistConfig)


async def _load(
    address: str, probes: list[gal.Probe], concurrency: int, tls: TlsFiles
) -> tuple[list[float], float]:
    """Sends every probe as its own Identify call, ``concurrency`` at a time; latencies (ms) and
    the elapsed wall time (s)."""
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with open_channel(address, tls) as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        # One call first, so connection set-up is not charged to the first batch.
        await stub.Identify(gal.IdentifyRequest(probes=probes[:1]), timeout=120)

        async def one(probe: gal.Probe) -> None:
            async with gate:
                started = time.perf_counter()
                await stub.Identify(gal.IdentifyRequest(probes=[probe], max_results=5), timeout=300)
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in probes))
        return latencies, time.perf_counter() - started


async def run_batching_bench(
    config: BatchingBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Runs every setting against the same gallery and load; returns one row per setting."""
    population = generate_population(seed=config.seed, persons=config.persons, bookings=config.requests)
    probes = [
        gal.Probe(
            probe_id=f"B-{i:04d}", tenprint=population.bookings[i % len(population.bookings)].booking.tenprint
        )
        for i in range(config.requests)
    ]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedprint-batching-") as root:
        # The node as deployed: mTLS, searched by the coordinator's identity.
        pki = issue_dev_pki(Path(root) / "pki")
        for i, setting in enumerate(config.settings):
            node_config = NodeConfig(
                node="iafis",
                data_dir=Path(root),
                batching=setting,
                torch_threads=config.torch_threads,
                shortlist=config.shortlist,
                tls=pki["iafis"],
            )
            progress(f"node with max_batch={setting.max_batch}, max_wait_ms={setting.max_wait_ms}")
            node = build_node(node_config)
            await node.start()
            try:
                if i == 0:
                    progress(f"enrolling {len(population.iafis)} subjects")
                    await enroll(node.host.address, population.iafis, tls=pki["admin"])
                progress(
                    f"{config.requests} calls, {config.concurrency} at a time, max_batch={setting.max_batch}"
                )
                before = node.servicer.batcher.stats.items, node.servicer.batcher.stats.batches
                latencies, elapsed = await _load(
                    node.host.address, probes, config.concurrency, pki["coordinator"]
                )
                stats = node.servicer.batcher.stats
                items, batches = stats.items - before[0], stats.batches - before[1]
            finally:
                await node.stop(0)
            lat = np.array(latencies)
            rows.append(
                {
                    "max_batch": setting.max_batch,
                    "max_wait_ms": setting.max_wait_ms,
                    "probes_per_second": len(latencies) / elapsed,
                    "p50_ms": float(np.percentile(lat, 50)),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "mean_batch": items / batches if batches else 0.0,
                }
            )
    baseline = rows[0]["probes_per_second"]
    for row in rows:
        row["throughput_vs_unbatched"] = row["probes_per_second"] / baseline
    shortlisted = config.shortlist.enabled and len(population.iafis) >= config.shortlist.min_gallery
    return {
        "gallery_size": len(population.iafis),
        "shortlist_candidates": config.shortlist.candidates if shortlisted else None,
        "requests": config.requests,
        "concurrency": config.concurrency,
        "settings": rows,
    }
