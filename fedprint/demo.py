"""``fedprint demo``: the whole federation on one machine, checked against ground truth.

Starts the ICE service, both gallery nodes and the coordinator as separate
processes on 127.0.0.1, enrolls the synthetic galleries through ``Enroll``,
submits the bookings concurrently through ``SubmitBooking``, waits for the ICE
outbox to drain, and compares every decision with the generator's ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.clients import Submission, enroll, submit_bookings, wait_for_notifications
from fedprint.config import calibrated_thresholds
from fedprint.pki import TlsFiles, issue_dev_pki
from fedprint.report import decisions_table, ice_table
from synthetic.population import GroundTruth, generate_population, write_population

STARTUP_TIMEOUT_S = 90.0
#: The demo's impression preset: the one the shipped thresholds (fedprint/thresholds.yaml) were
#: calibrated on, so the demo shows the decisions a calibrated node makes.
DEMO_DIFFICULTY = "realistic"


@dataclass
class ServiceProcess:
    role: str
    process: asyncio.subprocess.Process
    address: str
    log: Path


async def start_service(role: str, config: dict[str, Any], workdir: Path) -> ServiceProcess:
    """Starts ``fedprint serve ROLE`` and waits until it reports its bound address."""
    config_path = workdir / f"{role}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ready = workdir / f"{role}.ready"
    ready.unlink(missing_ok=True)
    log = workdir / f"{role}.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fedprint",
            "serve",
            role,
            "--config",
            str(config_path),
            "--ready-file",
            str(ready),
            stdout=log_file,
            stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.exists() or not ready.read_text().strip():
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{role} did not start; see {log}")
        await asyncio.sleep(0.1)
    return ServiceProcess(role, process, ready.read_text().strip(), log)


async def stop_service(service: ServiceProcess, timeout_s: float = 15.0) -> int:
    """SIGTERM, then wait for a graceful exit (SIGKILL past the timeout); returns the exit code."""
    if service.process.returncode is None:
        service.process.terminate()
        try:
            await asyncio.wait_for(service.process.wait(), timeout_s)
        except TimeoutError:
            service.process.kill()
            await service.process.wait()
    return service.process.returncode or 0


@contextlib.asynccontextmanager
async def federation(workdir: Path, pki: dict[str, TlsFiles]) -> AsyncIterator[dict[str, str]]:
    """The four services as processes speaking mTLS; yields their addresses by role and stops
    them all on exit."""
    started: list[ServiceProcess] = []
    common = {"listen": "127.0.0.1:0", "log_level": "info"}

    def tls(role: str) -> dict[str, str]:
        files = pki[role]
        return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}

    try:
        started.append(
            await start_service(
                "ice", {**common, "data_dir": str(workdir / "ice"), "tls": tls("ice")}, workdir
            )
        )
        nodes = await asyncio.gather(
            *(
                start_service(
                    node,
                    {
                        **common,
                        "node": node,
                        "data_dir": str(workdir / node),
                        "tls": tls(node),
                        # Both nodes share this machine's cores: one torch thread each.
                        "torch_threads": 1,
                    },
                    workdir,
                )
                for node in ("iafis", "ident")
            )
        )
        started.extend(nodes)
        addresses = {s.role: s.address for s in started}
        coordinator = {
            **common,
            "data_dir": str(workdir / "coordinator"),
            "iafis_address": addresses["iafis"],
            "ident_address": addresses["ident"],
            "ice_address": addresses["ice"],
            "node_deadline_s": 60.0,
            "tls": tls("coordinator"),
        }
        started.append(await start_service("coordinator", coordinator, workdir))
        yield {s.role: s.address for s in started}
    finally:
        # The coordinator first, so nothing new reaches the nodes while they stop.
        codes = [await stop_service(s) for s in reversed(started)]
        bad = [s.role for s, code in zip(reversed(started), codes, strict=True) if code not in (0, -15)]
        if bad:
            raise RuntimeError(f"services exited uncleanly: {bad}")


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


async def run_demo(
    console: Console, *, persons: int, bookings: int, seed: int, workdir: Path | None = None
) -> dict[str, Any]:
    """Runs the demo end to end; returns the summary that ``--json`` writes."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedprint-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
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
        console.print("starting ICE, IAFIS, IDENT and the coordinator (mTLS, development CA)")
        pki = issue_dev_pki(workdir / "pki")
        client = pki["booking-system"]
        async with federation(workdir, pki) as addresses:
            console.print(
                "services: " + ", ".join(f"{role} {address}" for role, address in addresses.items())
            )
            with console.status("enrolling both galleries"):
                await asyncio.gather(
                    enroll(addresses["iafis"], population.iafis, tls=client),
                    enroll(addresses["ident"], population.ident, tls=client),
                )
            with console.status("submitting bookings"):
                results: list[Submission] = await submit_bookings(
                    addresses["coordinator"],
                    [b.booking for b in population.bookings],
                    concurrency=8,
                    tls=client,
                )
            verdicts = [check(r.decision, b.truth) for r, b in zip(results, population.bookings, strict=True)]
            queued = sum(
                1 for r in results if r.decision is not None and r.decision.notification == bk.QUEUED
            )
            with console.status("waiting for the ICE outbox to deliver"):
                received = await wait_for_notifications(addresses["ice"], queued, timeout_s=30, tls=client)
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
            "thresholds": thresholds.model_dump(mode="json", exclude={"fpir_curve"}),
        }
        colour = "green" if summary["wrong"] == 0 else "red"
        console.print(
            f"[{colour}]{summary['correct']} of {summary['bookings']} decisions right, "
            f"{summary['wrong']} wrong[/{colour}]"
            f"; {summary['notifications']} notifications {summary['by_level']}; {summary['elapsed_s']} s"
        )
        return summary
