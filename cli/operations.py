"""``fedprint audit`` and ``fedprint outbox``: what an operator of the coordinator runs on its
database (the coordinator's own data directory, or its PostgreSQL URL)."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from federation.config import CoordinatorConfig
from federation.store import CoordinatorStore

DbOption = Annotated[
    str | None, typer.Option("--db", help="database URL; default: the coordinator's, from --config")
]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="the coordinator's YAML config")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _database_url(db: str | None, config: Path | None) -> str:
    if db:
        return db
    if config is None:
        raise typer.BadParameter("give --db URL or --config of the coordinator")
    settings = CoordinatorConfig.load(config)
    return settings.resolved_database_url() or f"sqlite:///{settings.data_dir / 'coordinator.sqlite'}"


def register(app: typer.Typer, console: Console) -> None:
    """Adds the ``audit`` and ``outbox`` command groups to ``app``."""
    audit_app = typer.Typer(no_args_is_help=True, help="The coordinator's hash-chained audit log.")
    outbox_app = typer.Typer(no_args_is_help=True, help="Notifications ICE has not acknowledged.")
    app.add_typer(audit_app, name="audit")
    app.add_typer(outbox_app, name="outbox")

    @audit_app.command("verify")
    def verify(db: DbOption = None, config: ConfigOption = None, json_out: JsonOption = False) -> None:
        """Checks every entry of the audit log against the chain; exits 1 naming the first break."""
        store = CoordinatorStore(_database_url(db, config))
        try:
            checked, broken = store.verify_audit()
        finally:
            store.close()
        if json_out:
            out: dict[str, object] = {"entries": checked, "intact": broken is None}
            if broken is not None:
                out |= {"first_broken_entry": broken.seq, "tcn": broken.tcn, "reason": broken.reason}
            console.print_json(json.dumps(out))
        elif broken is None:
            console.print(f"[green]audit log intact[/green]: {checked} entries")
        else:
            where = f"entry {broken.seq} (TCN {broken.tcn or '-'})"
            console.print(f"[red]audit log broken at {where}[/red]: {broken.reason}")
        if broken is not None:
            raise typer.Exit(1)

    @outbox_app.command("list")
    def list_outbox(db: DbOption = None, config: ConfigOption = None, json_out: JsonOption = False) -> None:
        """Dead letters and pending notifications, oldest first, with their attempts and last error."""
        store = CoordinatorStore(_database_url(db, config))
        try:
            entries = store.undelivered()
        finally:
            store.close()
        now = dt.datetime.now(dt.UTC)
        if json_out:
            rows = [
                {
                    "tcn": e.tcn,
                    "state": "dead" if e.dead else "pending",
                    "level": e.level,
                    "attempts": e.attempts,
                    "age_s": round((now - e.created_at).total_seconds(), 1),
                    "last_error": e.last_error,
                }
                for e in entries
            ]
            console.print_json(json.dumps(rows))
            return
        table = Table(title=f"{len(entries)} notifications not acknowledged by ICE")
        for column in ("TCN", "state", "level", "attempts", "age", "last error"):
            table.add_column(column)
        for e in entries:
            age = now - e.created_at
            table.add_row(
                e.tcn,
                "[red]dead letter[/red]" if e.dead else "pending",
                str(e.level),
                str(e.attempts),
                str(dt.timedelta(seconds=round(age.total_seconds()))),
                e.last_error,
            )
        console.print(table)

    @outbox_app.command("retry")
    def retry(
        tcn: Annotated[str, typer.Argument(help="TCN of the dead letter to send again")],
        db: DbOption = None,
        config: ConfigOption = None,
    ) -> None:
        """Puts a dead letter back into the outbox; the running coordinator delivers it (audited)."""
        store = CoordinatorStore(_database_url(db, config))
        try:
            requeued = store.retry_dead_letter(
                tcn, operator=f"operator {getpass.getuser()} (fedprint outbox)"
            )
        finally:
            store.close()
        if not requeued:
            console.print(f"[red]no dead letter for TCN {tcn}[/red]")
            raise typer.Exit(1)
        console.print(f"{tcn}: back in the outbox")
