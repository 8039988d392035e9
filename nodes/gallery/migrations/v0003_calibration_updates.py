"""The thresholds a node learns from its own gallery: one row per change, with the evidence it
rests on (``nodes.gallery.learner``); the newest row under the node's configured calibration is
the one it restarts with.

Revision 0003, after 0002.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gallery_calibration_updates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prior", sa.String(length=32), nullable=False),
        sa.Column("gallery_size", sa.Integer(), nullable=False),
        sa.Column("subjects", sa.Integer(), nullable=False),
        sa.Column("pairs", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("thresholds", sa.Text(), nullable=False),
        sa.Column("moves", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("gallery_calibration_updates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gallery_calibration_updates_prior"), ["prior"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("gallery_calibration_updates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gallery_calibration_updates_prior"))
    op.drop_table("gallery_calibration_updates")
