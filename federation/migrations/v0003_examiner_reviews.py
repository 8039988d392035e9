"""Examiner reviews of borderline IDENT matches (fedprint.review.v1), with the booking sealed
for the examiner's comparison until the verdict.

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
        "reviews",
        sa.Column("tcn", sa.String(length=64), nullable=False),
        sa.Column("ori", sa.String(length=9), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("examiner", sa.Text(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("review", sa.LargeBinary(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("tcn"),
    )
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reviews_opened_at"), ["opened_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_reviews_ori"), ["ori"], unique=False)
        batch_op.create_index(batch_op.f("ix_reviews_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reviews_state"))
        batch_op.drop_index(batch_op.f("ix_reviews_ori"))
        batch_op.drop_index(batch_op.f("ix_reviews_opened_at"))

    op.drop_table("reviews")
