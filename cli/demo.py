"""``fedprint demo``: the whole federation on one machine, checked against ground truth.

Starts the ICE service, both gallery nodes and the coordinator as separate
processes on 127.0.0.1, enrolls the synthetic galleries through ``Enroll``,
submits the bookings concurrently through ``SubmitBooking``, waits for the ICE
outbox to drain, and compares every decision with the generator's ground truth.
With ``shards`` > 1 each node runs as a router in front of that many shard processes;
with ``database`` (a PostgreSQL URL) every service keeps its store in a database of its own
on that server instead of a SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cli.report import decisions_table, ice_table
from evaluation.calibration import calibrated_thresholds
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.clients import Submission, enroll, submit_bookings, wait_for_notifications
from fedprint.database import scratch_databases
from fedprint.pki import agency_name, issue_dev_pki
from launcher.processes import federation
from synthetic.population import GroundTruth, generate_population, write_population

#: The demo's impression preset: the one the shipped thresholds (evaluation/thresholds.yaml) were
#: calibrated on, so the demo shows the decisions a calibrated node makes.
DEMO_DIFFICULTY = "realistic"


def check(decision: bk.BookingDecision | None, truth: GroundTruth) -> list[str]:
    """What is wrong with a decision against the ground truth (empty when right)."""
    if decision is None:
        return ["no decision"]
    problems = []
    if decision.status != bk.COMPLETE:
        problems.append("incomplete")
    for name, result, expected in (
        ("IAFIS", decision.iafis, truth.iafis_subject_id),
        ("IDENT", decision.ident, truth.ident_subject_id),
    ):
        hit = result.band == bio.HIT and bool(result.candidates)
        if expected is None and hit:
            problems.append(f"{name} false hit {result.candidates[0].subject_id}")
        elif expected is not None and not hit:
            problems.append(f"{name} missed {expected} ({bio.DecisionBand.Name(result.band)})")
        elif expected is not None and result.candidates[0].subject_id != expected:
            problems.append(f"{name} hit {result.candidates[0].subject_id}, expected {expected}")
    if decision.level != truth.expected_level:
        problems.append(f"level {decision.level}, expected {truth.expected_level}")
    notified = decision.notification in (bk.QUEUED, bk.DELIVERED)
    if notified != truth.expect_notification:
        problems.append(f"notification {bk.NotificationState.Name(decision.notification)}")
    return problems


#: The services that keep a store (a database each).
STORES = ("coordinator", "iafis", "ident", "ice")


async def run_demo(
    console: Console,
    *,
    persons: int,
    bookings: int,
    seed: int,
    workdir: Path | None = None,
    shards: int = 1,
    database: str | None = None,
) -> dict[str, Any]:
    """Runs the demo end to end; returns the summary that ``--json`` writes."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        keep = workdir is not None
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedprint-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        database_urls: dict[str, str] | None = None
        if database is not None:
            # A database per service on that server, named for this run; dropped at the end
            # unless the run keeps its files (--workdir).
            run = f"fedprint_demo_{os.getpid()}_{int(time.time())}"
            names = {f"{run}_{store}": store for store in STORES}
            created = stack.enter_context(scratch_databases(database, list(names), keep=keep))
            database_urls = {names[name]: url for name, url in created.items()}
            console.print(f"databases: {', '.join(created)}{' (kept)' if keep else ''}")
        with console.status("generating the synthetic population"):
            population = generate_population(
                seed=seed, persons=persons, bookings=bookings, difficulty=DEMO_DIFFICULTY
            )
            write_population(population, workdir / "population")
        console.print(
            f"population: {len(population.iafis)} IAFIS subjects, {len(population.ident)} IDENT subjects, "
            f"{len(population.bookings)} bookings (seed {seed})"
        )
        thresholds = calibrated_thresholds()
        console.print(
            f"node thresholds: hit {thresholds.hit:.4f} (FPIR {thresholds.hit_fpir:g}), review "
            f"{thresholds.review:.4f} (FPIR {thresholds.review_fpir:g}); {thresholds.source}"
        )
        layout = f"each node a router and {shards} shards" if shards > 1 else "each node one process"
        console.print(f"starting ICE, IAFIS, IDENT and the coordinator (mTLS, development CA; {layout})")
        # Every role separated: the services' own identities, a gallery administrator who enrolls,
        # one booking-agency certificate per ORI that submits, ICE reading its queue.
        oris = sorted({b.booking.ori for b in population.bookings})
        pki = issue_dev_pki(workdir / "pki", oris=oris)
        agencies = {ori: pki[agency_name(ori)] for ori in oris}
        console.print(f"identities: {', '.join(pki)}")
        async with federation(workdir, pki, shards=shards, database_urls=database_urls) as addresses:
            console.print(
                "services: " + ", ".join(f"{role} {address}" for role, address in addresses.items())
            )
            with console.status("enrolling both galleries"):
                await asyncio.gather(
                    enroll(addresses["iafis"], population.iafis, tls=pki["admin"]),
                    enroll(addresses["ident"], population.ident, tls=pki["admin"]),
                )
            with console.status("submitting bookings"):
                results: list[Submission] = await submit_bookings(
                    addresses["coordinator"],
                    [b.booking for b in population.bookings],
                    concurrency=8,
                    agencies=agencies,
                )
            verdicts = [check(r.decision, b.truth) for r, b in zip(results, population.bookings, strict=True)]
            queued = sum(
                1 for r in results if r.decision is not None and r.decision.notification == bk.QUEUED
            )
            with console.status("waiting for the ICE outbox to deliver"):
                received = await wait_for_notifications(
                    addresses["ice"], queued, timeout_s=30, tls=pki["ice"]
                )
        console.print(
            decisions_table(results, ["ok" if not v else "[red]" + "; ".join(v) + "[/red]" for v in verdicts])
        )
        console.print(ice_table(received))
        decisions = [r.decision for r in results if r.decision is not None]
        summary: dict[str, Any] = {
            "bookings": len(results),
            "iafis_hits": sum(d.iafis.band == bio.HIT for d in decisions),
            "ident_hits": sum(d.ident.band == bio.HIT for d in decisions),
            "notifications": len(received),
            "by_level": {
                str(level): sum(n.notification.level == level for n in received) for level in (1, 2, 3)
            },
            "incomplete": sum(d.status != bk.COMPLETE for d in decisions)
            + sum(r.decision is None for r in results),
            "correct": sum(not v for v in verdicts),
            "wrong": sum(bool(v) for v in verdicts),
            "reviews": sum(d.notification == bk.EXAMINER_REVIEW for d in decisions),
            "suppressed": sum(d.notification == bk.SUPPRESSED for d in decisions),
            "p50_ms": round(statistics.median(r.latency_ms for r in results), 1) if results else 0.0,
            "elapsed_s": round(time.perf_counter() - started, 1),
            "difficulty": DEMO_DIFFICULTY,
            "shards": shards,
            "database": "postgresql" if database is not None else "sqlite",
            "thresholds": thresholds.model_dump(mode="json", exclude={"fpir_curve"}),
        }
        colour = "green" if summary["wrong"] == 0 else "red"
        console.print(
            f"[{colour}]{summary['correct']} of {summary['bookings']} decisions right, "
            f"{summary['wrong']} wrong[/{colour}]"
            f"; {summary['notifications']} notifications {summary['by_level']}; {summary['elapsed_s']} s"
        )
        return summary
