"""Partitions and versions: each subject's bucket (the stable hash a shard selects its partition
by) and the version of the enrolment that wrote it, the store's change counter, and a row per
removed subject, so that shards and replicas sharing the store keep their galleries in step
(:mod:`nodes.gallery.store`). Subjects already stored get their buckets computed here."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from nodes.gallery.partition import subject_bucket

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gallery_removals",
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subject_id"),
    )
    with op.batch_alter_table("gallery_removals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gallery_removals_version"), ["version"], unique=False)

    with op.batch_alter_table("gallery_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.BigInteger(), server_default="0", nullable=False))

    with op.batch_alter_table("gallery_subjects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bucket", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("version", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.create_index(batch_op.f("ix_gallery_subjects_version"), ["version"], unique=False)

    # The buckets of the subjects enrolled before partitions existed.
    subjects = sa.table(
        "gallery_subjects", sa.column("subject_id", sa.String), sa.column("bucket", sa.Integer)
    )
    connection = op.get_bind()
    ids = list(connection.scalars(sa.select(subjects.c.subject_id)))
    for start in range(0, len(ids), 1000):
        connection.execute(
            subjects.update()
            .where(subjects.c.subject_id == sa.bindparam("id"))
            .values(bucket=sa.bindparam("b")),
            [{"id": s, "b": subject_bucket(s)} for s in ids[start : start + 1000]],
        )


def downgrade() -> None:
    with op.batch_alter_table("gallery_subjects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gallery_subjects_version"))
        batch_op.drop_column("version")
        batch_op.drop_column("bucket")

    with op.batch_alter_table("gallery_state", schema=None) as batch_op:
        batch_op.drop_column("version")

    with op.batch_alter_table("gallery_removals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gallery_removals_version"))

    op.drop_table("gallery_removals")
