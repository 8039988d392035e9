"""A review per booking and node: an IAFIS candidate in the review band opens a review too, so
a review's key is its TCN and the node ("iafis" or "ident") whose candidate is under review.
Reviews from before are all of IDENT candidates.

Revision 0005, after 0004.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _reviews(node: bool) -> sa.Table:
    """The reviews table as 0004 left it, with the node column or without and with no primary
    key: what SQLite's copy-and-rename starts from (its reflection would keep the old key)."""
    columns: list[sa.Column[Any]] = [
        sa.Column("tcn", sa.String(length=64), nullable=False),
        *([sa.Column("node", sa.String(length=8), nullable=False)] if node else []),
        sa.Column("ori", sa.String(length=9), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("examiner", sa.Text(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("review", sa.LargeBinary(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
    ]
    table = sa.Table("reviews", sa.MetaData(), *columns)
    for column in ("opened_at", "ori", "state"):
        sa.Index(f"ix_reviews_{column}", table.c[column])
    return table


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot change a primary key in place: the table is copied under the new one.
        with op.batch_alter_table("reviews", copy_from=_reviews(node=False)) as batch_op:
            batch_op.add_column(
                sa.Column("node", sa.String(length=8), nullable=False, server_default="ident")
            )
            batch_op.create_primary_key("pk_reviews", ["tcn", "node"])
    else:
        op.add_column(
            "reviews", sa.Column("node", sa.String(length=8), nullable=False, server_default="ident")
        )
        op.drop_constraint("reviews_pkey", "reviews", type_="primary")
        op.create_primary_key("reviews_pkey", "reviews", ["tcn", "node"])
    with op.batch_alter_table("reviews") as batch_op:
        batch_op.alter_column("node", server_default=None)


def downgrade() -> None:
    op.execute("DELETE FROM reviews WHERE node <> 'ident'")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("reviews", copy_from=_reviews(node=True)) as batch_op:
            batch_op.drop_column("node")
            batch_op.create_primary_key("pk_reviews", ["tcn"])
    else:
        op.drop_constraint("reviews_pkey", "reviews", type_="primary")
        op.drop_column("reviews", "node")
        op.create_primary_key("reviews_pkey", "reviews", ["tcn"])
