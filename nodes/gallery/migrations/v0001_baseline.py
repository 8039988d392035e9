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
        "gallery_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "gallery_subjects",
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("subject_id"),
    )
    op.create_table(
        "gallery_fingers",
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("format", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["subject_id"], ["gallery_subjects.subject_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("subject_id", "position"),
    )


def downgrade() -> None:
    op.drop_table("gallery_fingers")
    op.drop_table("gallery_subjects")
    op.drop_table("gallery_state")
