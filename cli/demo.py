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
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console

from calibration.thresholds import calibrated_thresholds
from cli.report import decisions_table, ice_table
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

#: The demo's impression preset: the one the shipped thresholds (calibration/thresholds.yaml) were
#: calibrated on, so the demo shows the decisions a calibrated node makes.
DEMO_DIFFICULTY = "realistic"


def check(decision: bk.BookingDecision | None, truth: GroundTruth) -> list[str]:
    """What is wrong with a decision against the ground truth (empty when right). A candidate an
    examiner confirmed (``confirmed_subject_id``) counts as a hit."""
    if decision is None:
        return ["no decision"]
    problems = []
    if decision.status != bk.COMPLETE:
        problems.append("incomplete")
    for name, result, expected in (
        ("IAFIS", decision.iafis, truth.iafis_subject_id),
        ("IDENT", decision.ident, truth.ident_subject_id),
    ):
        found = result.confirmed_subject_id or (
            result.candidates[0].subject_id if result.band == bio.HIT and result.candidates else ""
        )
        if expected is None and found:
            problems.append(f"{name} false hit {found}")
        elif expected is not None and not found:
            problems.append(f"{name} missed {expected} ({bio.DecisionBand.Name(result.band)})")
        elif expected is not None and found != expected:
            problems.append(f"{name} hit {found}, expected {expected}")
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


def convicted_booking(bookings: list[SyntheticBooking]) -> SyntheticBooking:
    """Three fingers of someone IAFIS knows and IDENT does not: too few agree for an automated
    IAFIS hit, so the criminal history counts toward the level only once an examiner confirms."""
    source = next(b for b in bookings if b.truth.iafis_subject_id and not b.truth.ident_subject_id)
    return partial_booking(source, 3, "-CNV")


def check_partial(decision: bk.BookingDecision | None, truth: GroundTruth, kind: str) -> list[str]:
    """A partial booking is right when it is complete and no node made it an automated hit (too
    few fingers agree); then, by ``kind``: the ``citizen`` whose IDENT match an examiner
    confirmed is suppressed by the policy; the ``convicted`` person whose IAFIS match an
    examiner confirmed has the level of the full booking, convictions included."""
    if decision is None or decision.status != bk.COMPLETE:
        return ["partial booking: no complete decision"]
    automated = [name for name in ("iafis", "ident") if getattr(decision, name).band == bio.HIT]
    if automated:
        return [f"partial booking was an automated {' and '.join(automated).upper()} hit"]
    if kind == "citizen":
        if decision.ident.confirmed_subject_id != truth.ident_subject_id:
            return ["the citizen's IDENT match was not confirmed"]
        if decision.notification != bk.SUPPRESSED:
            return [f"confirmed citizen {bk.NotificationState.Name(decision.notification)}, not SUPPRESSED"]
    if kind == "convicted":
        if decision.iafis.confirmed_subject_id != truth.iafis_subject_id:
            return ["the IAFIS match was not confirmed"]
        if decision.level != truth.expected_level:
            return [f"level {decision.level} after the IAFIS confirmation, expected {truth.expected_level}"]
    return []


@dataclass(frozen=True)
class Reviewed:
    """One review the demo's examiner worked."""

    tcn: str
    node: str
    confirmed: bool


async def examine(coordinator: str, workdir: Path, truth: dict[str, GroundTruth]) -> list[Reviewed]:
    """The demo's examiner lists the open reviews and works each through the command line
    (`fedprint review list`, `show`, then `confirm` or `reject`), as a person would; the demo
    plays the examiner's eye with the ground truth."""
    reviewed = []
    common = ["--address", coordinator, "--tls-dir", str(workdir / "pki")]
    for review in json.loads(await _fedprint("review", "list", "--json", "--limit", "1000", *common)):
        tcn, node = review["tcn"], review["node"]
        png = workdir / f"review-{tcn}-{node}.png"
        await _fedprint("review", "show", review["review_id"], "--png", str(png), *common)
        expected = truth[tcn].iafis_subject_id if node == "iafis" else truth[tcn].ident_subject_id
        same_person = expected == review["subject_id"]
        verdict = "confirm" if same_person else "reject"
        note = "minutiae agree finger by finger" if same_person else "ridge detail differs"
        await _fedprint("review", verdict, review["review_id"], "--note", note, *common)
        reviewed.append(Reviewed(tcn, node, same_person))
    return reviewed


async def _fedprint(*args: str) -> str:
    """Runs a ``fedprint`` command as its own process; returns what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "1000"},
    )
    output, errors = await process.communicate()
    if process.returncode != 0:
        text = (output + errors).decode(errors="replace")
        raise RuntimeError(f"fedprint {' '.join(args[:3])} failed: {text}")
    return output.decode()


@dataclass(frozen=True)
class AgencyMessage:
    """A decision as a booking agency received it, and through which call."""

    rpc: str
    decision: bk.BookingDecision

    def to_json(self) -> str:
        return json.dumps({"rpc": self.rpc, "decision": MessageToDict(self.decision)}, sort_keys=True)


@contextlib.asynccontextmanager
async def watching(
    coordinator: str, agencies: dict[str, TlsFiles], into: list[AgencyMessage]
) -> AsyncIterator[None]:
    """Each agency watches its own ORI's decisions (``WatchDecisions``) while the block runs;
    what they receive is appended to ``into``."""
    channels = {ori: open_channel(coordinator, tls, server="coordinator") for ori, tls in agencies.items()}
    calls = []
    try:
        for ori, channel in channels.items():
            call = bk_grpc.BookingServiceStub(channel).WatchDecisions(bk.WatchDecisionsRequest(ori=ori))
            await call.initial_metadata()  # the watch is registered: it misses nothing decided after
            calls.append(call)

        async def drain(call: Any) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                async for decision in call:
                    into.append(AgencyMessage("WatchDecisions", decision))

        tasks = [asyncio.create_task(drain(call)) for call in calls]
        yield
    finally:
        for call in calls:
            call.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in channels.values():
            await channel.close(None)


async def _final(coordinator: str, submission: Submission, agencies: dict[str, TlsFiles]) -> Submission:
    """A reviewed booking's decision as its agency reads it after the examiner's verdict."""
    assert submission.decision is not None
    ori = submission.decision.ori
    async with open_channel(coordinator, agencies[ori], server="coordinator") as channel:
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
    agency_log: Path | None = None,
) -> dict[str, Any]:
    """Runs the demo end to end; returns the summary that ``--json`` writes. With ``agency_log``,
    writes there every decision the booking agencies received (:class:`AgencyMessage`, a JSON
    object per line)."""
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
                    enroll(addresses["iafis"], population.iafis, tls=pki["admin"], node="iafis"),
                    enroll(addresses["ident"], population.ident, tls=pki["admin"], node="ident"),
                )
            partial = {
                "lone": one_finger_booking(population.bookings),
                "citizen": citizen_booking(population.bookings),
                "convicted": convicted_booking(population.bookings),
            }
            kinds = {b.booking.tcn: kind for kind, b in partial.items()}
            bookings_sent = [*population.bookings, *partial.values()]
            # Everything an agency receives, for the disclosure audit (--agency-log).
            seen: list[AgencyMessage] = []
            async with watching(addresses["coordinator"], agencies, seen):
                with console.status("submitting bookings"):
                    answers: list[Submission] = await submit_bookings(
                        addresses["coordinator"],
                        [b.booking for b in bookings_sent],
                        concurrency=8,
                        agencies=agencies,
                    )
                seen += [AgencyMessage("SubmitBooking", a.decision) for a in answers if a.decision]
                reviewed = await examine(
                    addresses["coordinator"], workdir, {b.booking.tcn: b.truth for b in bookings_sent}
                )
                worked = {r.tcn for r in reviewed}
                for answer in answers:
                    if answer.tcn in worked:
                        final = await _final(addresses["coordinator"], answer, agencies)
                        if final.decision is not None:
                            seen.append(AgencyMessage("GetDecision", final.decision))
            # The agencies are told of IAFIS and of a referral to ICE only: the decisions are
            # checked as the coordinator keeps them.
            sent = {b.booking.tcn: (b.booking.ori, b.booking.tcn) for b in bookings_sent}
            kept = await asyncio.to_thread(addresses.kept_decisions, sent.values())
            results = [dataclasses.replace(a, decision=kept.get(sent[a.tcn])) for a in answers]
            verdicts = [
                check_partial(r.decision, b.truth, kinds[r.tcn])
                if r.tcn in kinds
                else check(r.decision, b.truth)
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
            "iafis_reviews": sum(r.node == "iafis" for r in reviewed),
            "one_finger_bookings": 1,
            "reviews_confirmed": sum(r.confirmed for r in reviewed),
            "iafis_reviews_confirmed": sum(r.confirmed and r.node == "iafis" for r in reviewed),
            "confirmed_and_suppressed": sum(
                bool(d.ident.confirmed_subject_id) and d.notification == bk.SUPPRESSED for d in decisions
            ),
            "suppressed": sum(d.notification == bk.SUPPRESSED for d in decisions),
            "p50_ms": round(statistics.median(r.latency_ms for r in results), 1) if results else 0.0,
            "elapsed_s": round(time.perf_counter() - started, 1),
            "difficulty": DEMO_DIFFICULTY,
            "shards": shards,
            "database": "postgresql" if database is not None else "sqlite",
            "thresholds": thresholds.model_dump(mode="json", exclude={"fpir_curve"}),
        }
        if agency_log is not None:
            await asyncio.to_thread(agency_log.write_text, "".join(m.to_json() + "\n" for m in seen))
        summary["agency_messages"] = len(seen)
        colour = "green" if summary["wrong"] == 0 else "red"
        console.print(
            f"[{colour}]{summary['correct']} of {summary['bookings']} decisions right, "
            f"{summary['wrong']} wrong[/{colour}]"
            f"; {summary['notifications']} notifications {summary['by_level']}; {summary['elapsed_s']} s"
        )
        return summary
