"""A notification is ICE's once per booking, and a booking is its ORI and TCN: rows are keyed
``ORI/TCN``, so two agencies' bookings of one TCN are two notifications. Existing rows take their
ORI from the notification they hold.

Revision 0002, after 0001.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

from fedprint.ice.v1 import ice_pb2 as ice

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(text("SELECT tcn, notification FROM notifications WHERE tcn NOT LIKE '%/%'"))
    for tcn, payload in rows.all():
        ori = ice.Notification.FromString(payload).ori
        connection.execute(
            text("UPDATE notifications SET tcn = :key WHERE tcn = :tcn"), {"key": f"{ori}/{tcn}", "tcn": tcn}
        )


def downgrade() -> None:
    # An ORI is nine characters, then the "/"; it fails where two agencies' bookings share a TCN.
    op.execute("UPDATE notifications SET tcn = substr(tcn, 11) WHERE tcn LIKE '%/%'")
