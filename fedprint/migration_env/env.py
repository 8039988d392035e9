"""Alembic's environment for every fedprint store; :mod:`fedprint.migrations` runs it.

It never opens a connection of its own: the caller hands over a connection, already inside the
transaction (and lock) the whole upgrade runs in, with the store's version table and models.
"""

from alembic import context

config = context.config
metadata = config.attributes["metadata"]


def _own_tables_only(name: str | None, type_: str, parent_names: object) -> bool:
    # Several stores share one database (a node's gallery tables and its record model's): each
    # compares and migrates its own tables only.
    return type_ != "table" or name in metadata.tables


context.configure(
    connection=config.attributes["connection"],
    target_metadata=metadata,
    version_table=config.attributes["version_table"],
    include_name=_own_tables_only,
    # SQLite alters tables by copying them ("batch" mode); PostgreSQL alters them in place.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
