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
        "iafis_subjects",
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("sex", sa.String(length=1), nullable=False),
        sa.Column("year_of_birth", sa.Integer(), nullable=False),
        sa.Column("height_cm", sa.Integer(), nullable=False),
        sa.Column("place_of_birth", sa.String(length=2), nullable=False),
        sa.PrimaryKeyConstraint("subject_id"),
    )
    op.create_table(
        "iafis_arrests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("arrested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ori", sa.String(length=9), nullable=False),
        sa.Column("disposition", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["subject_id"], ["iafis_subjects.subject_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_iafis_arrests_subject_id", "iafis_arrests", ["subject_id"])
    op.create_table(
        "iafis_charges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("arrest_id", sa.Integer(), nullable=False),
        sa.Column("ncic_code", sa.String(length=4), nullable=False),
        sa.Column("literal", sa.String(length=200), nullable=False),
        sa.Column("counts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["arrest_id"], ["iafis_arrests.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_iafis_charges_arrest_id", "iafis_charges", ["arrest_id"])


def downgrade() -> None:
    op.drop_index("ix_iafis_charges_arrest_id", "iafis_charges")
    op.drop_table("iafis_charges")
    op.drop_index("ix_iafis_arrests_subject_id", "iafis_arrests")
    op.drop_table("iafis_arrests")
    op.drop_table("iafis_subjects")
