"""``fedprint audit`` and ``fedprint outbox``: what an operator of the coordinator runs on its
database (the coordinator's own data directory, or its PostgreSQL URL); ``fedprint db``: schema
migrations of every service's database."""

from __future__ import annotations

import datetime as dt
import enum
import getpass
import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from federation.audit import ChainBreak
from federation.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from federation.config import CoordinatorConfig
from federation.store import MIGRATIONS as COORDINATOR
from federation.store import CoordinatorStore, DeadLetterPurged
from fedprint.database import connect
from fedprint.migrations import Migrations, current, new_revision, upgrade
from fedprint.settings import ServiceSettings

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


KeyOption = Annotated[
    Path | None, typer.Option("--key", help="the audit key file; default: the coordinator's, from --config")
]


def _audit_key(key: Path | None, config: Path | None) -> bytes | None:
    """The audit key from ``--key``, else from the coordinator's config; None with neither."""
    path = key or (CoordinatorConfig.load(config).audit_key_path() if config is not None else None)
    if path is None:
        return None
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as error:
        raise typer.BadParameter(f"{path}: not an audit key ({error})") from error


def register(app: typer.Typer, console: Console) -> None:
    """Adds the ``audit`` and ``outbox`` command groups to ``app``."""
    audit_app = typer.Typer(no_args_is_help=True, help="The coordinator's hash-chained audit log.")
    outbox_app = typer.Typer(no_args_is_help=True, help="Notifications ICE has not acknowledged.")
    app.add_typer(audit_app, name="audit")
    app.add_typer(outbox_app, name="outbox")

    @audit_app.command("verify")
    def verify(
        db: DbOption = None,
        config: ConfigOption = None,
        key: KeyOption = None,
        checkpoint: Annotated[
            Path | None,
            typer.Option(help="the audit checkpoint directory; default: the coordinator's, from --config"),
        ] = None,
        json_out: JsonOption = False,
    ) -> None:
        """Checks every entry of the audit log against its keyed chain, every stored decision and
        ICE notice against the digests the log recorded, and the log against the latest signed
        checkpoint (so that a cut end shows); exits 1 naming the first break."""
        settings = CoordinatorConfig.load(config) if config is not None else None
        checkpoints = checkpoint or (settings.audit_checkpoint_dir if settings is not None else None)
        audit_key = _audit_key(key, config)
        if audit_key is None:
            raise typer.BadParameter("give --key (the audit key file) or --config of the coordinator")
        store = CoordinatorStore(_database_url(db, config), audit_key=audit_key)
        try:
            checked, broken = store.verify_audit()
            seen: Checkpoint | None = None
            if broken is None and checkpoints is not None:
                try:
                    seen = read_checkpoint(checkpoints, audit_key)
                except CheckpointError as error:
                    broken = ChainBreak(0, "", str(error))
                if seen is not None:
                    entries, _ = store.audit_head()
                    broken = seen.check(entries, store.audit_hash_at(seen.entries))
        finally:
            store.close()
        if json_out:
            out: dict[str, object] = {"entries": checked, "intact": broken is None}
            if seen is not None:
                out["checkpoint"] = {"entries": seen.entries, "written_at": seen.written_at.isoformat()}
            if broken is not None:
                out |= {"first_broken_entry": broken.seq, "tcn": broken.tcn, "reason": broken.reason}
            console.print_json(json.dumps(out))
        elif broken is None:
            against = (
                f", checkpoint of {seen.entries} entries at {seen.written_at:%Y-%m-%d %H:%M:%S}"
                if seen
                else ""
            )
            if checkpoints is None:
                against = " (no checkpoint directory given: a cut end would not show)"
            console.print(f"[green]audit log intact[/green]: {checked} entries{against}")
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
                    "state": ("purged" if e.purged else "dead") if e.dead else "pending",
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
                ("[red]dead letter (purged)[/red]" if e.purged else "[red]dead letter[/red]")
                if e.dead
                else "pending",
                str(e.level),
                str(e.attempts),
                str(dt.timedelta(seconds=round(age.total_seconds()))),
                e.last_error,
            )
        console.print(table)

    @outbox_app.command("retry")
    def retry(
        tcn: Annotated[
            str, typer.Argument(help="the dead letter's booking, ORI/TCN (as `fedprint outbox list` shows)")
        ],
        db: DbOption = None,
        config: ConfigOption = None,
        key: KeyOption = None,
    ) -> None:
        """Puts a dead letter back into the outbox; the running coordinator delivers it (audited,
        under the audit key: the coordinator's, from --config, or --key)."""
        store = CoordinatorStore(_database_url(db, config), audit_key=_audit_key(key, config))
        try:
            if not store.audit_key_fits():
                raise typer.BadParameter(
                    "the audit log is chained under a key: give it (--key, or --config of the coordinator)"
                )
            requeued = store.retry_dead_letter(
                tcn, operator=f"operator {getpass.getuser()} (fedprint outbox)"
            )
        except DeadLetterPurged as purged:
            console.print(f"[red]{purged}[/red]")
            raise typer.Exit(1) from None
        finally:
            store.close()
        if not requeued:
            console.print(f"[red]no dead letter for booking {tcn}[/red]")
            raise typer.Exit(1)
        console.print(f"{tcn}: back in the outbox")


class DbService(enum.StrEnum):
    coordinator = "coordinator"
    iafis = "iafis"
    ident = "ident"
    ice = "ice"


class History(enum.StrEnum):
    coordinator = "coordinator"
    gallery = "gallery"
    iafis = "iafis"
    ident = "ident"
    ice = "ice"


def _histories() -> dict[str, Migrations]:
    """Every store's schema history by name."""
    from ice_service.server import MIGRATIONS as ICE
    from nodes.gallery.store import MIGRATIONS as GALLERY
    from nodes.iafis.records import CriminalHistoryStore
    from nodes.ident.records import ImmigrationHistoryStore

    return {
        "coordinator": COORDINATOR,
        "gallery": GALLERY,
        "iafis": CriminalHistoryStore.migrations,
        "ident": ImmigrationHistoryStore.migrations,
        "ice": ICE,
    }


#: The histories in each service's database, in the order they are applied.
_SERVICE_HISTORIES = {
    "coordinator": ("coordinator",),
    "iafis": ("gallery", "iafis"),
    "ident": ("gallery", "ident"),
    "ice": ("ice",),
}


def _service_url(service: str, db: str | None, config: Path | None) -> str:
    if db:
        return db
    if config is None:
        raise typer.BadParameter(f"give --db URL or --config of the {service} service")
    settings: ServiceSettings
    if service == "coordinator":
        settings = CoordinatorConfig.load(config)
    elif service == "ice":
        from ice_service.config import IceConfig

        settings = IceConfig.load(config)
    else:
        from nodes.gallery.config import NodeConfig

        settings = NodeConfig.load(config, node=service)
    return settings.resolved_database_url() or f"sqlite:///{settings.data_dir / (service + '.sqlite')}"


def register_db(app: typer.Typer, console: Console) -> None:
    """Adds the ``db`` command group: schema migrations of the stores (fedprint/migrations.py)."""
    db_app = typer.Typer(no_args_is_help=True, help="Schema migrations of the services' databases.")
    app.add_typer(db_app, name="db")

    @db_app.command("upgrade")
    def db_upgrade(
        service: Annotated[DbService, typer.Argument(help="whose database")],
        db: DbOption = None,
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="the service's YAML config")
        ] = None,
    ) -> None:
        """Brings a service's database to the newest schema (what the service also does when it
        starts), e.g. before rolling out a release."""
        histories = _histories()
        engine = connect(_service_url(service.value, db, config))
        try:
            stores = [histories[h] for h in _SERVICE_HISTORIES[service.value]]
            upgrade(engine, stores)
            for migrations in stores:
                console.print(
                    f"{migrations.name}: at {current(engine, migrations)} (newest {migrations.head()})"
                )
        finally:
            engine.dispose()

    @db_app.command("status")
    def db_status(
        service: Annotated[DbService, typer.Argument(help="whose database")],
        db: DbOption = None,
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="the service's YAML config")
        ] = None,
    ) -> None:
        """Each schema history's revision in a service's database and the newest there is; exits 1
        when the database is behind."""
        histories = _histories()
        engine = connect(_service_url(service.value, db, config))
        behind = False
        try:
            for name in _SERVICE_HISTORIES[service.value]:
                migrations = histories[name]
                at, head = current(engine, migrations), migrations.head()
                behind |= at != head
                console.print(f"{name}: at {at or 'nothing'}, newest {head}")
        finally:
            engine.dispose()
        if behind:
            raise typer.Exit(1)

    @db_app.command("revision")
    def db_revision(
        history: Annotated[History, typer.Argument(help="the schema history: whose models changed")],
        message: Annotated[str, typer.Option("--message", "-m", help="what the revision changes")],
    ) -> None:
        """Writes the next revision of a store's schema history from the difference between its
        newest revision and its models (for developers; review the file before committing)."""
        with tempfile.TemporaryDirectory() as scratch:
            engine = connect(f"sqlite:///{Path(scratch) / 'scratch.sqlite'}")
            try:
                path = new_revision(engine, _histories()[history.value], message)
            finally:
                engine.dispose()
        console.print(f"wrote {path}")
