"""A booking's rows are keyed by its ORI and TCN, ``ORI/TCN``: a TCN is its agency's own. The
decisions and reviews carry their ORI already; the outbox, its dead letters and the sealed pending
bookings take it from their decision. The audit log is append-only and hash-chained, so its
entries keep the TCN they were written with (the store matches them to their bookings).

Revision 0007, after 0006.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: Tables whose rows take their ORI from the booking's decision.
FOLLOWERS = ("outbox", "outbox_dead_letters", "pending_bookings")


def upgrade() -> None:
    connection = op.get_bind()
    longest = connection.execute(text("SELECT max(length(tcn)) FROM decisions")).scalar()
    if longest is not None and longest > 54:
        # ORI/TCN must fit the 64 characters of the key columns (a TCN is now at most 54).
        raise RuntimeError(
            f"a stored TCN has {longest} characters: TCNs longer than 54 cannot be keyed by ORI/TCN"
        )
    # The followers first, while the decisions still hold the bare TCN they join on.
    for table in FOLLOWERS:
        connection.execute(
            text(
                f"UPDATE {table} SET tcn = (SELECT d.ori || '/' || d.tcn FROM decisions d "
                f"WHERE d.tcn = {table}.tcn) WHERE tcn NOT LIKE '%/%' "
                f"AND EXISTS (SELECT 1 FROM decisions d WHERE d.tcn = {table}.tcn)"
            )
        )
    for table in ("reviews", "decisions"):
        connection.execute(text(f"UPDATE {table} SET tcn = ori || '/' || tcn WHERE tcn NOT LIKE '%/%'"))


def downgrade() -> None:
    # Back to bare TCNs (an ORI is nine characters, then the "/"); it fails where two agencies'
    # bookings share a TCN, which the older schema cannot hold.
    connection = op.get_bind()
    for table in (*FOLLOWERS, "reviews", "decisions"):
        connection.execute(text(f"UPDATE {table} SET tcn = substr(tcn, 11) WHERE tcn LIKE '%/%'"))
