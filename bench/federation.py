"""``fedprint bench federation``: bookings through the whole federation, as processes on
this machine over mTLS, at a fixed concurrency. Latency percentiles, throughput,
errors, and what was lost (a booking without a stored decision, or a queued
notification that never reached ICE).

With chaos (:mod:`bench.chaos`), the services are SIGKILLed and restarted while the bookings go
in; the submitters resend on transient failures, the federation is then given time to settle, and
the result says what was lost, what is not final, and how often each IDENT hit reached ICE."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.chaos import ChaosConfig, ChaosMonkey, account, chaos_schedule, settle
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.clients import Retry, Submission, enroll, submit_bookings, wait_for_notifications
from fedprint.pki import TlsFiles, agency_name, issue_dev_pki
from fedprint.rpc import open_channel
from launcher.processes import Federation, federation
from synthetic.population import generate_population


@dataclass(frozen=True)
class FederationBenchConfig:
    """How much load, against how big a population."""

    bookings: int = 120
    concurrency: int = 16
    persons: int = 300
    seed: int = 3
    #: Partitions per node: above 1, each node runs as a router in front of this many shards.
    shards: int = 1
    #: Kill and restart the services during the run (None: no chaos).
    chaos: ChaosConfig | None = None


async def _lost_decisions(address: str, bookings: list[bk.Booking], agencies: dict[str, TlsFiles]) -> int:
    """Bookings the coordinator has no decision for (each asked for by its own agency)."""
    lost = 0
    for ori, identity in agencies.items():
        async with open_channel(address, identity, server="coordinator") as channel:
            stub = bk_grpc.BookingServiceStub(channel)
            for booking in (b for b in bookings if b.ori == ori):
                try:
                    await stub.GetDecision(bk.GetDecisionRequest(tcn=booking.tcn), timeout=10)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    lost += 1
    return lost


async def run_federation_bench(config: FederationBenchConfig, workdir: Path | None = None) -> dict[str, Any]:
    """Runs the load and returns the DESIGN.md fields (plus a few for context)."""
    population = generate_population(seed=config.seed, persons=config.persons, bookings=40)
    # Distinct TCNs: every submission is a new booking, not an idempotent replay.
    bookings: list[bk.Booking] = []
    for i in range(config.bookings):
        booking = bk.Booking()
        booking.CopyFrom(population.bookings[i % len(population.bookings)].booking)
        booking.tcn = f"BENCH-{i:06d}"
        bookings.append(booking)
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedprint-bench-")))
        oris = sorted({b.ori for b in bookings})
        pki = issue_dev_pki(root / "pki", oris=oris)
        agencies = {ori: pki[agency_name(ori)] for ori in oris}
        async with federation(root, pki, shards=config.shards) as addresses:
            await asyncio.gather(
                enroll(addresses["iafis"], population.iafis, tls=pki["admin"]),
                enroll(addresses["ident"], population.ident, tls=pki["admin"]),
            )
            if config.chaos is not None:
                monkey = ChaosMonkey(addresses.services, chaos_schedule(config.chaos), len(bookings))
                return await _chaos_run(config, config.chaos, monkey, addresses, bookings, agencies, pki) | {
                    "gallery_sizes": {"iafis": len(population.iafis), "ident": len(population.ident)}
                }
            started = time.perf_counter()
            results = await submit_bookings(
                addresses["coordinator"], bookings, concurrency=config.concurrency, agencies=agencies
            )
            elapsed = time.perf_counter() - started
            queued = {
                r.tcn for r in results if r.decision is not None and r.decision.notification == bk.QUEUED
            }
            received = await wait_for_notifications(
                addresses["ice"], len(queued), timeout_s=60, tls=pki["ice"]
            )
            lost = await _lost_decisions(addresses["coordinator"], bookings, agencies)
        lost += len(queued - {n.notification.tcn for n in received})
    latencies = np.array([r.latency_ms for r in results if r.decision is not None])
    return {
        "bookings": len(bookings),
        "concurrency": config.concurrency,
        "shards": config.shards,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
        "bookings_per_second": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "errors": sum(1 for r in results if r.decision is None),
        "lost": lost,
        "incomplete": sum(1 for r in results if r.decision is not None and r.decision.status != bk.COMPLETE),
        "notifications": len(received),
        "gallery_sizes": {"iafis": len(population.iafis), "ident": len(population.ident)},
        "elapsed_s": elapsed,
    }


#: How the chaos bench's submitters resend: long enough to outlast a coordinator restart.
CHAOS_RETRY = Retry(attempts=12, initial_s=0.25, max_s=5.0)


def _latency_fields(results: list[Submission], elapsed: float) -> dict[str, Any]:
    latencies = np.array([r.latency_ms for r in results if r.decision is not None])
    return {
        "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "p90_ms": float(np.percentile(latencies, 90)) if latencies.size else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
        "max_ms": float(latencies.max()) if latencies.size else None,
        "bookings_per_second": len(latencies) / elapsed if elapsed > 0 else 0.0,
    }


async def _chaos_run(
    config: FederationBenchConfig,
    chaos: ChaosConfig,
    monkey: ChaosMonkey,
    addresses: Federation,
    bookings: list[bk.Booking],
    agencies: dict[str, TlsFiles],
    pki: dict[str, TlsFiles],
) -> dict[str, Any]:
    """Submits under the chaos schedule, lets the federation settle, and accounts for every
    booking and every IDENT hit."""
    started = time.perf_counter()
    chaos_task = asyncio.create_task(monkey.run())
    try:
        results = await submit_bookings(
            addresses["coordinator"],
            bookings,
            concurrency=config.concurrency,
            agencies=agencies,
            retry=CHAOS_RETRY,
            on_done=lambda _: monkey.answered(),
        )
        elapsed = time.perf_counter() - started
        monkey.submissions_done()
        await chaos_task
    finally:
        if not chaos_task.done():
            chaos_task.cancel()
    settled, settle_s = await settle(addresses["coordinator"], pki["admin"], chaos.settle_timeout_s)
    tcns_by_ori: dict[str, list[str]] = {}
    for booking in bookings:
        tcns_by_ori.setdefault(booking.ori, []).append(booking.tcn)
    counts = await account(
        addresses["coordinator"],
        addresses["ice"],
        tcns_by_ori,
        agencies,
        pki["ice"],
        addresses.kept_decisions,
    )
    errors: collections.Counter[str] = collections.Counter(
        r.error.split(":", 1)[0] for r in results if r.decision is None
    )
    return {
        "bookings": len(bookings),
        "concurrency": config.concurrency,
        "shards": config.shards,
        **_latency_fields(results, elapsed),
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
        "resubmissions": sum(r.attempts - 1 for r in results),
        "resubmission_codes": dict(collections.Counter(code for r in results for code in r.retried)),
        **asdict(counts),
        "incomplete_when_answered": sum(
            1 for r in results if r.decision is not None and r.decision.status != bk.COMPLETE
        ),
        "elapsed_s": elapsed,
        "chaos": {
            "seed": chaos.seed,
            "kills": monkey.kills(),
            "events": monkey.report(),
            "settled": settled,
            "settle_s": round(settle_s, 3),
        },
    }
