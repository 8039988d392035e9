"""Minimal disclosure: what of a decision the booking agency receives and the coordinator keeps.

The nodes already attach a record only to HIT candidates. On top of that the coordinator strips,
from the decision it returns, stores, audits and streams, every immigration record (that goes to
ICE alone, in the notification) and any record of a candidate that is not a HIT. The agency learns
the criminal history on an IAFIS hit and whether the booking was referred to ICE
(``notification``), never an immigration record and never the record of someone who did not match.
"""

from __future__ import annotations

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk


def agency_view(decision: bk.BookingDecision) -> bk.BookingDecision:
    """A copy of ``decision`` holding only what the booking agency may see."""
    view = bk.BookingDecision()
    view.CopyFrom(decision)
    for candidate in view.iafis.candidates:
        if candidate.band != bio.HIT and candidate.subject_id != view.iafis.confirmed_subject_id:
            candidate.ClearField("record")
    for candidate in view.ident.candidates:
        candidate.ClearField("record")
    return view
