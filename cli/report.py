"""Rich tables for decisions and the ICE queue (what the CLI and the demo print)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.clients import Submission
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.records.v1 import records_pb2 as rec


def _node_cell(result: bk.NodeResult) -> str:
    if result.outcome != bk.ANSWERED:
        return f"[red]{bk.NodeOutcome.Name(result.outcome)}[/red]"
    band = bio.DecisionBand.Name(result.band)
    if not result.candidates:
        return band
    top = result.candidates[0]
    colour = {"HIT": "green", "REVIEW": "yellow"}.get(band, "dim")
    subject = top.subject_id if result.band != bio.NO_HIT else ""
    return f"[{colour}]{band}[/{colour}] {subject} {top.fused_score:.3f}"


def level_name(level: int) -> str:
    return "-" if level == rec.THREAT_LEVEL_UNSPECIFIED else str(level)


def decisions_table(results: Sequence[Submission], verdicts: Sequence[str] | None = None) -> Table:
    """One row per booking: both node results (band, subject, fused score), level, notification."""
    table = Table(title="Booking decisions", show_lines=False)
    for column in ("TCN", "status", "IAFIS", "IDENT", "level", "ICE", "ms"):
        table.add_column(column)
    if verdicts is not None:
        table.add_column("check")
    for i, r in enumerate(results):
        if r.decision is None:
            row = [r.tcn, f"[red]{r.error}[/red]", "", "", "", "", f"{r.latency_ms:.0f}"]
        else:
            d = r.decision
            row = [
                d.tcn,
                bk.DecisionStatus.Name(d.status),
                _node_cell(d.iafis),
                _node_cell(d.ident),
                level_name(d.level),
                bk.NotificationState.Name(d.notification),
                f"{r.latency_ms:.0f}",
            ]
        if verdicts is not None:
            row.append(verdicts[i])
        table.add_row(*row)
    return table


def ice_table(received: Sequence[ice.ReceivedNotification]) -> Table:
    """The ICE queue in the order the service lists it: level, then time received."""
    table = Table(title="ICE notifications (priority order)")
    for column in ("level", "TCN", "ORI", "IDENT subject", "score", "status", "IAFIS subject", "charges"):
        table.add_column(column)
    for item in received:
        n = item.notification
        table.add_row(
            level_name(n.level),
            n.tcn,
            n.ori,
            n.ident_match.subject_id,
            f"{n.ident_match.fused_score:.3f}",
            rec.ImmigrationStatus.Name(n.ident_match.immigration_history.status),
            n.iafis_match.subject_id or "-",
            ", ".join(c.ncic_code for c in n.charges),
        )
    return table
