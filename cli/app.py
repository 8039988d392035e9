"""The ``fedprint`` command: one verb per job."""

from __future__ import annotations

import asyncio
import enum
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from cli import accuracy as _accuracy
from cli import an2 as _an2
from cli import operations as _operations
from cli.certs import register as _register_certs
from cli.identity import InsecureOption, TlsDirOption
from cli.identity import identity as _identity
from cli.review import register as _register_review
from fedprint.logging import configure
from fedprint.pki import TlsFiles, agency_name

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Piped output (CI logs, files) gets room for the decision tables.
console = Console(width=None if sys.stdout.isatty() else 150)


class Role(enum.StrEnum):
    coordinator = "coordinator"
    iafis = "iafis"
    ident = "ident"
    ice = "ice"


ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file")]


@app.command()
def serve(
    role: Annotated[Role, typer.Argument(help="which service to run")],
    config: ConfigOption = None,
    listen: Annotated[str | None, typer.Option(help="host:port, overrides the config")] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="write the bound address here once serving (for supervisors)")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="serve plaintext and admit every caller (local debugging only; warns at start)"
        ),
    ] = False,
) -> None:
    """Runs one service until SIGTERM/SIGINT, then shuts it down gracefully.

    The service speaks mutual TLS with the files of its config's ``tls`` section and refuses to
    start without them, unless told ``--insecure`` (or ``insecure: true``)."""
    from launcher.services import run_service

    asyncio.run(run_service(role.value, config, listen=listen, ready_file=ready_file, insecure=insecure))


@app.command()
def enroll(
    data: Annotated[
        Path,
        typer.Argument(help="population directory written by `fedprint synth`, or a data set (manifest.csv)"),
    ],
    node: Annotated[Role, typer.Option(help="iafis or ident")],
    address: Annotated[str, typer.Option(help="the node's host:port")],
    tls_dir: TlsDirOption = Path("pki"),
    insecure: InsecureOption = False,
) -> None:
    """Enrolls a population's IAFIS or IDENT gallery into a running node, as the gallery
    administrator (``admin`` in the PKI directory). A data set in the standard layout enrols the
    first gallery capture of each of its subjects instead, with an empty record (data sets carry
    templates only), read from disk a stream at a time."""
    from fedprint.clients import Enrollable
    from fedprint.clients import enroll as enroll_entries

    if node not in (Role.iafis, Role.ident):
        raise typer.BadParameter("enroll into iafis or ident")
    tls = _identity(tls_dir, "admin", insecure)
    entries: Sequence[Enrollable]
    if (data / "manifest.csv").exists():
        from fedprint.datasets import gallery_enrolments

        field = "criminal_history" if node == Role.iafis else "immigration_history"
        entries = gallery_enrolments(data, field)
    else:
        from synthetic.population import read_population

        population = read_population(data)
        entries = population.iafis if node == Role.iafis else population.ident
    with Progress(console=console) as progress:
        task = progress.add_task(f"enrolling into {node.value}", total=len(entries))
        size = asyncio.run(
            enroll_entries(
                address,
                entries,
                on_progress=lambda n: progress.advance(task, n),
                tls=tls,
                insecure=insecure,
                node=node.value,
            )
        )
    console.print(f"{node.value}: gallery holds {size} subjects")


@app.command()
def stats(
    address: Annotated[str, typer.Option(help="the node's (or its router's) host:port")],
    tls_dir: TlsDirOption = Path("pki"),
    insecure: InsecureOption = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write GetStats as JSON here")] = None,
    node: Annotated[
        Role | None, typer.Option(help="iafis or ident: refuse a server whose certificate is another's")
    ] = None,
) -> None:
    """A gallery node's statistics, as the gallery administrator: its size and the device and
    host memory its gallery holds, in all, per subject and by part (``GetStats``)."""
    from google.protobuf import json_format
    from rich.table import Table

    from fedprint.clients import gallery_stats

    answer = asyncio.run(
        gallery_stats(
            address,
            tls=_identity(tls_dir, "admin", insecure),
            insecure=insecure,
            node=node.value if node is not None else None,
        )
    )
    if json_out is not None:
        json_out.write_text(json.dumps(json_format.MessageToDict(answer), indent=2) + "\n")
    console.print(
        f"{answer.node}: {answer.gallery_size} subjects, {answer.finger_count} fingers, "
        f"device {answer.device}; {answer.device_bytes_per_subject:,.0f} device + "
        f"{answer.host_bytes_per_subject:,.0f} host bytes per subject"
    )
    table = Table("part", "location", "bytes", "per subject", "reserved bytes")
    for part in answer.memory:
        per_subject = part.bytes / answer.gallery_size if answer.gallery_size else 0.0
        table.add_row(
            part.part, part.location, f"{part.bytes:,}", f"{per_subject:,.0f}", f"{part.reserved_bytes:,}"
        )
    console.print(table)


@app.command()
def submit(
    data: Annotated[Path, typer.Argument(help="population directory written by `fedprint synth`")],
    address: Annotated[str, typer.Option(help="the coordinator's host:port")],
    concurrency: Annotated[int, typer.Option(help="bookings in flight at once")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the decisions as JSON here")] = None,
    tls_dir: TlsDirOption = Path("pki"),
    insecure: InsecureOption = False,
) -> None:
    """Submits a population's bookings to a running coordinator and prints the decisions. Each
    booking goes with its agency's certificate (``agency-<ORI>`` in the PKI directory)."""
    from google.protobuf import json_format

    from cli.report import decisions_table
    from fedprint.clients import submit_bookings
    from synthetic.population import read_population

    population = read_population(data)
    bookings = [b.booking for b in population.bookings]
    agencies: dict[str, TlsFiles] | None = None
    if not insecure:
        agencies = {}
        for ori in sorted({b.ori for b in bookings}):
            identity = _identity(tls_dir, agency_name(ori), insecure)
            assert identity is not None
            agencies[ori] = identity
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("submitting", total=len(bookings))
        results = asyncio.run(
            submit_bookings(
                address,
                bookings,
                concurrency=concurrency,
                on_done=lambda _: progress.advance(task),
                agencies=agencies,
                insecure=insecure,
            )
        )
    console.print(decisions_table(results))
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                [
                    {
                        "tcn": r.tcn,
                        "error": r.error,
                        "decision": json_format.MessageToDict(r.decision) if r.decision else None,
                    }
                    for r in results
                ],
                indent=2,
            )
        )


@app.command()
def demo(
    json_out: Annotated[Path | None, typer.Option("--json", help="write the summary as JSON here")] = None,
    persons: Annotated[int, typer.Option(help="synthetic persons")] = 600,
    bookings: Annotated[int, typer.Option(help="bookings to submit")] = 60,
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
    workdir: Annotated[Path | None, typer.Option(help="keep data, configs and logs here")] = None,
    shards: Annotated[
        int, typer.Option(min=1, help="partitions per node: >1 runs each node as a router and its shards")
    ] = 1,
    database: Annotated[
        str | None,
        typer.Option(
            help="a PostgreSQL server's URL (e.g. postgresql://127.0.0.1:5432/postgres): each service "
            "gets a database of its own there (dropped afterwards unless --workdir); default: SQLite files"
        ),
    ] = None,
    agency_log: Annotated[
        Path | None,
        typer.Option(
            help="write every decision the booking agencies received (answers, GetDecision, "
            "WatchDecisions), one JSON object per line, for a disclosure audit"
        ),
    ] = None,
) -> None:
    """Starts all four services, enrolls both galleries, submits bookings, checks every decision."""
    from cli.demo import run_demo

    configure("warning", json=False)
    summary = asyncio.run(
        run_demo(
            console,
            persons=persons,
            bookings=bookings,
            seed=seed,
            workdir=workdir,
            shards=shards,
            database=database,
            agency_log=agency_log,
        )
    )
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["wrong"] or summary["incomplete"]:
        raise typer.Exit(1)


def _register_bench() -> None:
    # `fedprint bench matcher ...`: the group lives in bench/ with the benchmarks it runs.
    from cli.bench import bench_app

    app.add_typer(bench_app, name="bench")


_register_bench()


# synth, match and eval live in their own module (the accuracy harness).
_accuracy.register(app, console)
# audit and outbox: operators' commands on the coordinator's database; db: schema migrations.
_operations.register(app, console)
# review: examiners' commands against the coordinator's ReviewService.
_register_review(app, console)
_register_certs(app, console)
_operations.register_db(app, console)
# an2: ANSI/NIST-ITL transactions (show, make).
_an2.register(app, console)


if __name__ == "__main__":
    app()
