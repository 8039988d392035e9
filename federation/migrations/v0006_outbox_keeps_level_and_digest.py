"""Notices leave the outbox once ICE acknowledges them: the outbox and its dead letters keep each
notice's level and SHA-256 digest beside it, so that a row whose notice was purged (delivered, or
a dead letter past its retention) still says what was sent. Existing rows get both from their
notice; their notices are purged by the running coordinator, audited (not here, behind the log).

Revision 0006, after 0005.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

from fedprint.ice.v1 import ice_pb2 as ice

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = ("outbox", "outbox_dead_letters")


def upgrade() -> None:
    connection = op.get_bind()
    for name in TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.add_column(sa.Column("level", sa.Integer(), server_default="0", nullable=False))
            batch_op.add_column(sa.Column("digest", sa.String(length=64), server_default="", nullable=False))
        table = sa.table(
            name,
            sa.column("tcn", sa.String),
            sa.column("notification", sa.LargeBinary),
            sa.column("level", sa.Integer),
            sa.column("digest", sa.String),
        )
        rows = connection.execute(sa.select(table.c.tcn, table.c.notification)).all()
        for tcn, payload in rows:
            connection.execute(
                table.update()
                .where(table.c.tcn == tcn)
                .values(
                    level=ice.Notification.FromString(payload).level,
                    digest=hashlib.sha256(payload).hexdigest(),
                )
            )


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_column("digest")
            batch_op.drop_column("level")
