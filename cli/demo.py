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
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cli.report import decisions_table, ice_table
from evaluation.calibration import calibrated_thresholds
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.clients import Submission, enroll, submit_bookings, wait_for_notifications
from fedprint.database import scratch_databases
from fedprint.pki import TlsFiles, agency_name, issue_dev_pki
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import open_channel
from launcher.processes import federation
from synthetic.population import GroundTruth, SyntheticBooking, generate_population, write_population

#: The demo's impression preset: the one the shipped thresholds (evaluation/thresholds.yaml) were
#: calibrated on, so the demo shows the decisions a calibrated node makes.
DEMO_DIFFICULTY = "realistic"


def check(decision: bk.BookingDecision | None, truth: GroundTruth, *, confirmed: bool = False) -> list[str]:
    """What is wrong with a decision against the ground truth (empty when right). ``confirmed``:
    an examiner confirmed the decision's review-band IDENT candidate, which makes it a hit."""
    if decision is None:
        return ["no decision"]
    problems = []
    if decision.status != bk.COMPLETE:
        problems.append("incomplete")
    for name, result, expected in (
        ("IAFIS", decision.iafis, truth.iafis_subject_id),
        ("IDENT", decision.ident, truth.ident_subject_id),
    ):
        hit = (result.band == bio.HIT or (name == "IDENT" and confirmed)) and bool(result.candidates)
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


def partial_booking(source: SyntheticBooking, fingers: int, suffix: str) -> SyntheticBooking:
    """``source`` sent again under its TCN plus ``suffix`` with its first ``fingers`` fingers
    only: too few to agree for an automated hit (the evidence rule), whatever they score."""
    booking = bk.Booking()
    booking.CopyFrom(source.booking)
    booking.tcn = f"{source.booking.tcn}{suffix}"
    kept = [f for f in booking.tenprint.fingers if f.WhichOneof("data") == "template"][:fingers]
    del booking.tenprint.fingers[:]
    booking.tenprint.fingers.extend(kept)
    return SyntheticBooking(booking, dataclasses.replace(source.truth, tcn=booking.tcn))


def one_finger_booking(bookings: list[SyntheticBooking]) -> SyntheticBooking:
    """A booking of a person IDENT knows, with one finger only: however well that finger
    matches, the policy's evidence rule keeps it from notifying ICE by itself."""
    source = next(b for b in bookings if b.truth.ident_subject_id and b.truth.expect_notification)
    return partial_booking(source, 1, "-ONE")


def citizen_booking(bookings: list[SyntheticBooking]) -> SyntheticBooking:
    """Three fingers of a naturalized citizen IDENT knows: an examiner confirms who it is, and the
    policy, not the examiner, suppresses the notice, as it would for the full ten-print."""
    source = next(b for b in bookings if b.truth.ident_status == rec.NATURALIZED_CITIZEN)
    return partial_booking(source, 3, "-CIT")


def check_partial(decision: bk.BookingDecision | None, confirmed: bool | None) -> list[str]:
    """A partial booking is right when it is complete, not an automated IDENT hit (it may reach
    ICE only through an examiner's confirmation), and, for a citizen whose match an examiner
    confirmed (``confirmed``; None: not a citizen), suppressed by the policy."""
    if decision is None or decision.status != bk.COMPLETE:
        return ["partial booking: no complete decision"]
    if decision.ident.band == bio.HIT:
        return ["partial booking was an automated IDENT hit"]
    if confirmed and decision.notification != bk.SUPPRESSED:
        return [f"confirmed citizen {bk.NotificationState.Name(decision.notification)}, not SUPPRESSED"]
    return []


async def examine(
    coordinator: str, workdir: Path, results: list[Submission], truth: dict[str, GroundTruth]
) -> dict[str, bool]:
    """The demo's examiner works every review through the command line (`fedprint review show`,
    then `confirm` or `reject`), as a person would; the demo plays the examiner's eye with the
    ground truth. Returns, per reviewed TCN, whether the match was confirmed."""
    reviewed: dict[str, bool] = {}
    common = ["--address", coordinator, "--tls-dir", str(workdir / "pki")]
    for r in results:
        if r.decision is None or r.decision.notification != bk.EXAMINER_REVIEW:
            continue
        png = workdir / f"review-{r.tcn}.png"
        await _fedprint("review", "show", r.tcn, "--png", str(png), *common)
        candidate = r.decision.ident.candidates[0].subject_id
        same_person = truth[r.tcn].ident_subject_id == candidate
        verdict = "confirm" if same_person else "reject"
        note = "minutiae agree finger by finger" if same_person else "ridge detail differs"
        await _fedprint("review", verdict, r.tcn, "--note", note, *common)
        reviewed[r.tcn] = same_person
    return reviewed


async def _fedprint(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"fedprint {' '.join(args[:3])} failed: {output.decode(errors='replace')}")


async def _final(coordinator: str, submission: Submission, agencies: dict[str, TlsFiles]) -> Submission:
    """A reviewed booking's decision as the coordinator holds it after the examiner's verdict."""
    assert submission.decision is not None
    ori = submission.decision.ori
    async with open_channel(coordinator, agencies[ori]) as channel:
        decision = await bk_grpc.BookingServiceStub(channel).GetDecision(
            bk.GetDecisionRequest(tcn=submission.tcn), timeout=10
        )
    return Submission(submission.tcn, decision, submission.error, submission.latency_ms)


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
            lone = one_finger_booking(population.bookings)
            citizen = citizen_booking(population.bookings)
            bookings_sent = [*population.bookings, lone, citizen]
            with console.status("submitting bookings"):
                results: list[Submission] = await submit_bookings(
                    addresses["coordinator"],
                    [b.booking for b in bookings_sent],
                    concurrency=8,
                    agencies=agencies,
                )
            reviewed = await examine(
                addresses["coordinator"],
                workdir,
                results,
                {b.booking.tcn: b.truth for b in bookings_sent},
            )
            results = [
                await _final(addresses["coordinator"], r, agencies) if r.tcn in reviewed else r
                for r in results
            ]
            verdicts = [
                check(r.decision, b.truth, confirmed=reviewed.get(r.tcn, False))
                if b not in (lone, citizen)
                else check_partial(r.decision, reviewed.get(r.tcn) if b is citizen else None)
                for r, b in zip(results, bookings_sent, strict=True)
            ]
            queued = sum(
                1
                for r in results
                if r.decision is not None and r.decision.notification in (bk.QUEUED, bk.DELIVERED)
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
            "reviews": len(reviewed),
            "one_finger_bookings": 1,
            "reviews_confirmed": sum(reviewed.values()),
            "confirmed_and_suppressed": sum(
                reviewed.get(d.tcn, False) and d.notification == bk.SUPPRESSED for d in decisions
            ),
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
