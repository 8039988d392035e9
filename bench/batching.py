"""``fedprint bench batching``: what dynamic micro-batching buys one gallery node.

One real node (loopback gRPC, its own SQLite store) is enrolled once, then restarted from its
database under each batching setting and sent the same concurrent single-probe ``Identify``
calls. Throughput and latency percentiles of every setting come from the same run, so their
ratios hold on a noisy machine even where the absolute figures do not.

The gallery is a synthetic population's IAFIS gallery, or (``data``) the gallery captures of a
data set in the standard layout, enrolled through the node's own ``Enroll`` and kept in
``workdir``: a later run restarts the node from its store and its cylinder cache (mapped, not
re-encoded) and enrols only what is missing. Each setting also answers one ``Identify`` call
carrying ``batch_probes`` probes, the micro-batch a node must answer within the coordinator's
deadline.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedprint.clients import Enrollable, enroll, gallery_stats
from fedprint.datasets import gallery_enrolments, identify_probe, probe_captures
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles, issue_dev_pki
from fedprint.rpc import open_channel
from minutiae.dataset import capture_refs
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
    #: A data set whose gallery captures are the gallery and whose probes are searched.
    data: Path | None = None
    #: Where the node's store and cache are kept between runs (``data`` only; default: a
    #: temporary directory).
    workdir: Path | None = None
    #: Probes of the one call each setting answers as a whole.
    batch_probes: int = 16
    #: What the coordinator waits for a node's answer (``node_deadline_s``).
    deadline_s: float = 20.0


async def _load(
    address: str, probes: list[gal.Probe], concurrency: int, tls: TlsFiles
) -> tuple[list[float], float]:
    """Sends every probe as its own Identify call, ``concurrency`` at a time; latencies (ms) and
    the elapsed wall time (s)."""
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with open_channel(address, tls, server="iafis") as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        # One call first, so connection set-up (and, for a shortlisted gallery, building the
        # faiss index) is not charged to the first batch.
        await stub.Identify(gal.IdentifyRequest(probes=probes[:1]), timeout=1800)

        async def one(probe: gal.Probe) -> None:
            async with gate:
                started = time.perf_counter()
                await stub.Identify(gal.IdentifyRequest(probes=[probe], max_results=5), timeout=300)
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in probes))
        return latencies, time.perf_counter() - started


async def _one_call(address: str, probes: list[gal.Probe], tls: TlsFiles) -> float:
    """Milliseconds one ``Identify`` call carrying all of ``probes`` takes."""
    async with open_channel(address, tls, server="iafis") as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        started = time.perf_counter()
        await stub.Identify(gal.IdentifyRequest(probes=probes, max_results=5), timeout=600)
        return (time.perf_counter() - started) * 1000


def _workload(config: BatchingBenchConfig) -> tuple[Sequence[Enrollable], list[gal.Probe]]:
    """The gallery to enrol and the probes to send."""
    if config.data is None:
        population = generate_population(seed=config.seed, persons=config.persons, bookings=config.requests)
        probes = [
            gal.Probe(
                probe_id=f"B-{i:04d}",
                tenprint=population.bookings[i % len(population.bookings)].booking.tenprint,
            )
            for i in range(config.requests)
        ]
        return population.iafis, probes
    # One read of the manifest for both (a large data set's has millions of rows).
    refs = capture_refs(config.data)
    gallery = gallery_enrolments(config.data, "criminal_history", refs)
    enrolled = {e.subject_id for e in gallery}
    mated = [c for c in probe_captures(config.data, refs) if c.subject_id in enrolled]
    if not mated:
        raise ValueError(f"{config.data}: no probe of an enrolled subject")
    rng = np.random.default_rng(config.seed)
    picks = rng.choice(len(mated), config.requests, replace=len(mated) < config.requests)
    return gallery, [identify_probe(config.data, mated[i], f"B-{n:04d}") for n, i in enumerate(picks)]


async def run_batching_bench(
    config: BatchingBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Runs every setting against the same gallery and load; returns one row per setting."""
    gallery, probes = _workload(config)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedprint-batching-") as root:
        data_dir = (
            config.workdir / "node" if config.workdir is not None and config.data is not None else Path(root)
        )
        # The node as deployed: mTLS, searched by the coordinator's identity.
        pki = issue_dev_pki(Path(root) / "pki")
        for i, setting in enumerate(config.settings):
            node_config = NodeConfig(
                node="iafis",
                data_dir=data_dir,
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
                    held = set(node.servicer.gallery.full_tier()[0])
                    missing = [e for e in gallery if e.subject_id not in held]
                    if missing:
                        progress(f"enrolling {len(missing)} subjects")
                        await enroll(node.host.address, missing, tls=pki["admin"])
                progress(
                    f"{config.requests} calls, {config.concurrency} at a time, max_batch={setting.max_batch}"
                )
                before = node.servicer.batcher.stats.items, node.servicer.batcher.stats.batches
                latencies, elapsed = await _load(
                    node.host.address, probes, config.concurrency, pki["coordinator"]
                )
                stats = node.servicer.batcher.stats
                items, batches = stats.items - before[0], stats.batches - before[1]
                batch_ms = await _one_call(
                    node.host.address, probes[: config.batch_probes], pki["coordinator"]
                )
                gallery_size = len(node.servicer.gallery)
                # What the node reports it holds, once a search has built everything it keeps.
                node_stats = await gallery_stats(node.host.address, tls=pki["admin"])
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
                    "one_call_ms": batch_ms,
                    "one_call_within_deadline": batch_ms <= config.deadline_s * 1000,
                }
            )
    baseline = rows[0]["probes_per_second"]
    for row in rows:
        row["throughput_vs_unbatched"] = row["probes_per_second"] / baseline
    shortlisted = config.shortlist.enabled and gallery_size >= config.shortlist.min_gallery
    return {
        "dataset": None if config.data is None else str(config.data),
        "gallery_size": gallery_size,
        "shortlist_candidates": config.shortlist.candidates if shortlisted else None,
        "requests": config.requests,
        "concurrency": config.concurrency,
        "one_call_probes": min(config.batch_probes, len(probes)),
        "deadline_s": config.deadline_s,
        "settings": rows,
        "get_stats": {
            "device": node_stats.device,
            "host_bytes_per_subject": node_stats.host_bytes_per_subject,
            "device_bytes_per_subject": node_stats.device_bytes_per_subject,
            "memory": [
                {"part": m.part, "location": m.location, "bytes": m.bytes, "reserved_bytes": m.reserved_bytes}
                for m in node_stats.memory
            ],
        },
    }
