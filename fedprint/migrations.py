"""Schema migrations of the stores, with Alembic, on SQLite and PostgreSQL alike.

Each store keeps its schema history as Alembic revisions in a directory of its own package
(``federation/migrations``, ``nodes/gallery/migrations``, each node's record model's, and
``ice_service/migrations``), and records how far its database is in a version table of its own
(``alembic_version_<store>``), so that stores sharing one database (a node's gallery and its
record model) migrate independently. A store upgrades its database to the newest revision when it
opens it; ``fedprint db upgrade`` does the same ahead of a deployment.

An upgrade is one transaction holding a lock, so that replicas starting together (coordinator
replicas, the shards of a node) upgrade once and the others find it done: PostgreSQL takes an
advisory lock, SQLite the database's write lock (``BEGIN IMMEDIATE``). A database created before
migrations existed (by ``create_all``) is recognised by its tables and stamped with the baseline
revision that describes exactly that schema, then upgraded like any other.

Adding a revision: change the models, then ``fedprint db revision STORE -m "what changes"`` writes
the next numbered file with the operations Alembic finds between the newest revision and the
models (review it; ``tests/test_stores.py::test_the_migrations_build_exactly_the_models_schema``
fails, on SQLite and on PostgreSQL, while models and revisions differ).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import Connection, Engine

#: The environment (env.py) and the template of new revisions, shared by every store.
_ENVIRONMENT = Path(__file__).with_name("migration_env")


@dataclass(frozen=True)
class Migrations:
    """One store's schema history."""

    #: Short name: the version table is ``alembic_version_<name>``; ``fedprint db`` names it so.
    name: str
    #: The directory of the store's revision files.
    versions: Path
    #: The store's models, the schema its newest revision must produce.
    metadata: MetaData
    #: The revision that equals the schema ``create_all`` made before migrations existed, and a
    #: table that tells such a database apart from an empty one; None for stores born migrated.
    baseline: str | None = None
    baseline_table: str | None = None

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.name}"

    def config(self, connection: Connection | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(_ENVIRONMENT))
        config.set_main_option("path_separator", "os")
        config.set_main_option("version_locations", str(self.versions))
        # Revision files are named v0001_slug.py: importable module names, in order.
        config.set_main_option("file_template", "v%%(rev)s_%%(slug)s")
        # A new revision file comes out formatted as the project formats code (ruff, a dev tool).
        config.set_section_option("post_write_hooks", "hooks", "ruff_format")
        config.set_section_option("post_write_hooks", "ruff_format.type", "module")
        config.set_section_option("post_write_hooks", "ruff_format.module", "ruff")
        config.set_section_option(
            "post_write_hooks", "ruff_format.options", "format REVISION_SCRIPT_FILENAME"
        )
        config.attributes.update(
            connection=connection, metadata=self.metadata, version_table=self.version_table
        )
        return config

    def head(self) -> str:
        """The newest revision."""
        heads = ScriptDirectory.from_config(self.config()).get_heads()
        if len(heads) != 1:
            raise RuntimeError(f"{self.name} migrations have {len(heads)} heads: {heads}; merge them")
        return heads[0]


def _lock(connection: Connection, name: str) -> None:
    """Takes the lock that makes concurrent upgrades of one database wait for each other."""
    if connection.dialect.name == "postgresql":
        # Held until the transaction ends; the key is the store's name, so two stores sharing a
        # database (a node's gallery and records) wait for each other too, which is harmless.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(name.encode()),))
    elif connection.dialect.name == "sqlite":
        # The write lock at once, before the version table is read (pysqlite would otherwise
        # start the transaction only at the first write, after another process read it too).
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def current(engine: Engine, migrations: Migrations) -> str | None:
    """The revision the database is at; None when it has none (empty, or from before migrations)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": migrations.version_table})
        return context.get_current_revision()


def upgrade(engine: Engine, stores: Sequence[Migrations]) -> None:
    """Brings the database to each store's newest revision (in order), in one locked transaction."""
    with engine.connect() as connection:
        _lock(connection, "fedprint-migrations")
        for migrations in stores:
            tables = set(inspect(connection).get_table_names())
            if (
                migrations.version_table not in tables
                and migrations.baseline is not None
                and migrations.baseline_table in tables
            ):
                command.stamp(migrations.config(connection), migrations.baseline)
            command.upgrade(migrations.config(connection), "head")
        connection.commit()


def differences(connection: Connection, migrations: Migrations) -> list[object]:
    """What Alembic finds between the migrated database and the models (empty when they agree)."""
    context = MigrationContext.configure(
        connection,
        opts={
            "include_name": lambda name, type_, _: type_ != "table" or name in migrations.metadata.tables,
            "compare_type": True,
        },
    )
    return list(compare_metadata(context, migrations.metadata))


def new_revision(engine: Engine, migrations: Migrations, message: str) -> Path:
    """Writes the next revision file of ``migrations``: the operations that take a database at the
    newest revision to the models. ``engine`` is a scratch database (it is upgraded first)."""
    upgrade(engine, [migrations])
    script = ScriptDirectory.from_config(migrations.config())
    numbers = [int(m.group(1)) for r in script.walk_revisions() if (m := re.fullmatch(r"(\d+)", r.revision))]
    with engine.connect() as connection:
        written = command.revision(
            migrations.config(connection),
            message=message,
            autogenerate=True,
            rev_id=f"{max(numbers, default=0) + 1:04d}",
        )
    scripts = written if isinstance(written, list) else [written]
    assert scripts and scripts[0] is not None
    return Path(scripts[0].path)
