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
        "ident_subjects",
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("prior_removals", sa.Integer(), nullable=False),
        sa.Column("sex", sa.String(length=1), nullable=False),
        sa.Column("year_of_birth", sa.Integer(), nullable=False),
        sa.Column("height_cm", sa.Integer(), nullable=False),
        sa.Column("place_of_birth", sa.String(length=2), nullable=False),
        sa.PrimaryKeyConstraint("subject_id"),
    )
    op.create_table(
        "ident_encounters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("encounter_id", sa.String(length=64), nullable=False),
        sa.Column("encountered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.Integer(), nullable=False),
        sa.Column("location", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["subject_id"], ["ident_subjects.subject_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ident_encounters_subject_id", "ident_encounters", ["subject_id"])


def downgrade() -> None:
    op.drop_index("ix_ident_encounters_subject_id", "ident_encounters")
    op.drop_table("ident_encounters")
    op.drop_table("ident_subjects")
