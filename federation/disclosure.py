"""Minimal disclosure: what the coordinator keeps of a decision, and what a booking agency sees.

Two views, each built here and nowhere else:

- :func:`kept_view`, the decision the coordinator stores, audits and works reviews from: the full
  evidence without any immigration record (that goes to ICE alone, in the notification) and
  without the record of an IAFIS candidate that is not a HIT. Examiners, administrators and
  ICE act on it.
- :func:`agency_view`, the only form in which a decision leaves the coordinator for a booking
  agency (``SubmitBooking``, ``GetDecision``, ``WatchDecisions``). It is built field by field from
  an allow-list (DESIGN.md section 8): the level, the IAFIS result with the criminal history of a
  hit or of a candidate an examiner confirmed, whether the booking was referred to ICE, and the
  reasons written for the agency. Nothing of IDENT reaches it but whether IDENT answered: no
  band, no candidate, no immigration status, no suppression, no examiner's note. A field added
  to the decision later stays out of the agency's view until it is added here.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk


def kept_view(decision: bk.BookingDecision) -> bk.BookingDecision:
    """A copy of ``decision`` as the coordinator keeps it: without immigration records, and with
    only the records of IAFIS candidates that are a HIT or were confirmed by an examiner."""
    view = bk.BookingDecision()
    view.CopyFrom(decision)
    _drop_unmatched_records(view.iafis)
    for candidate in view.ident.candidates:
        candidate.ClearField("record")
    return view


def _drop_unmatched_records(result: bk.NodeResult) -> None:
    """Clears the record of every candidate of ``result`` that is neither a HIT nor confirmed."""
    for candidate in result.candidates:
        if candidate.band != bio.HIT and candidate.subject_id != result.confirmed_subject_id:
            candidate.ClearField("record")


#: The notification state an agency sees: whether its booking was referred to ICE. A suppression
#: or a pending IDENT review would tell it of an IDENT match (and a suppression, of a status);
#: an undeliverable notice is a referral still, which the coordinator's operators complete.
AGENCY_NOTIFICATION: Mapping[bk.NotificationState.ValueType, bk.NotificationState.ValueType] = {
    bk.NOTIFICATION_STATE_UNSPECIFIED: bk.NOTIFICATION_STATE_UNSPECIFIED,
    bk.NOT_REQUIRED: bk.NOT_REQUIRED,
    bk.SUPPRESSED: bk.NOT_REQUIRED,
    bk.EXAMINER_REVIEW: bk.NOT_REQUIRED,
    bk.QUEUED: bk.QUEUED,
    bk.DELIVERED: bk.DELIVERED,
    bk.UNDELIVERABLE: bk.QUEUED,
    bk.DEFERRED: bk.DEFERRED,
}


def agency_view(decision: bk.BookingDecision) -> bk.BookingDecision:
    """What the booking agency may see of ``decision`` (a kept or a full decision alike)."""
    view = bk.BookingDecision(
        tcn=decision.tcn,
        ori=decision.ori,
        status=decision.status,
        level=decision.level,
        reasons=decision.agency_reasons,
        policy_version=decision.policy_version,
        notification=AGENCY_NOTIFICATION[decision.notification],
        attempt=decision.attempt,
    )
    if decision.HasField("decided_at"):
        view.decided_at.CopyFrom(decision.decided_at)
    view.iafis.CopyFrom(_agency_iafis(decision.iafis))
    # Of IDENT, only whether it answered (the agency's reasons say so when it did not).
    view.ident.node = decision.ident.node
    view.ident.outcome = decision.ident.outcome
    return view


def _agency_iafis(result: bk.NodeResult) -> bk.NodeResult:
    """IAFIS's result without the node's own error text (it names hosts) and without the record
    of any candidate that is neither a HIT nor confirmed."""
    view = bk.NodeResult()
    view.CopyFrom(result)
    view.ClearField("error")
    _drop_unmatched_records(view)
    return view
