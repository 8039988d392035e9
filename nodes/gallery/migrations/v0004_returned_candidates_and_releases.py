"""Need to know: the deciding candidates a node returned in the review or hit band, to whom and
for which probe (what lets that caller fetch the subject for an examiner, for a while), and the
node's record of every release of a subject (``nodes.gallery.releases``).

Revision 0004, after 0003.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gallery_returned_candidates",
        sa.Column("caller", sa.String(length=512), nullable=False),
        sa.Column("probe_id", sa.String(length=64), nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("band", sa.Integer(), nullable=False),
        sa.Column("returned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("caller", "probe_id", "subject_id"),
    )
    with op.batch_alter_table("gallery_returned_candidates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_gallery_returned_candidates_returned_at"), ["returned_at"], unique=False
        )
    op.create_table(
        "gallery_subject_releases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("caller", sa.String(length=512), nullable=False),
        sa.Column("probe_id", sa.String(length=64), nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("examiner", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("gallery_subject_releases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gallery_subject_releases_probe_id"), ["probe_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_gallery_subject_releases_released_at"), ["released_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("gallery_subject_releases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gallery_subject_releases_released_at"))
        batch_op.drop_index(batch_op.f("ix_gallery_subject_releases_probe_id"))
    op.drop_table("gallery_subject_releases")
    with op.batch_alter_table("gallery_returned_candidates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gallery_returned_candidates_returned_at"))
    op.drop_table("gallery_returned_candidates")
