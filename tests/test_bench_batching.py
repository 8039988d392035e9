"""``fedprint bench batching`` on a tiny gallery: concurrent calls really share device calls, here
through the shortlist tier, whose micro-batches are scored in one paired pass."""

from __future__ import annotations

from bench.batching import BatchingBenchConfig, run_batching_bench
from nodes.gallery.config import BatchingConfig, ShortlistConfig


async def test_concurrent_identify_calls_are_gathered_into_batches() -> None:
    config = BatchingBenchConfig(
        persons=30,
        requests=12,
        concurrency=6,
        settings=(
            BatchingConfig(max_batch=1, max_wait_ms=0.0),
            BatchingConfig(max_batch=6, max_wait_ms=20.0),
        ),
        shortlist=ShortlistConfig(min_gallery=1, candidates=5),
    )
    result = await run_batching_bench(config)
    assert result["shortlist_candidates"] == 5
    unbatched, batched = result["settings"]
    assert unbatched["mean_batch"] == 1.0 and unbatched["throughput_vs_unbatched"] == 1.0
    # Six calls in flight and a 20 ms window: the worker finds companions waiting.
    assert batched["mean_batch"] > 1.5
    assert all(row["p99_ms"] >= row["p50_ms"] > 0 for row in result["settings"])
