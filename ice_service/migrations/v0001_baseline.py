"""The schema as ``create_all`` made it before migrations existed: the baseline revision, which a
database from then is stamped with (:mod:`fedprint.migrations`)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("tcn", sa.String(length=64), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notification", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("tcn"),
    )
    op.create_index("ix_notifications_level", "notifications", ["level"])
    op.create_index("ix_notifications_received_at", "notifications", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_notifications_received_at", "notifications")
    op.drop_index("ix_notifications_level", "notifications")
    op.drop_table("notifications")
