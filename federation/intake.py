"""Booking intake: what a booking must carry before anything is searched or stored.

Two steps, so that nothing is decoded for a caller who may not submit: :func:`check_booking_header`
(identifiers, codes, counts and text, all cheap), then the coordinator checks the ORI against
the caller's certificate, then :func:`check_booking_tenprint` decodes the templates.
"""

from __future__ import annotations

from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.rpc import InvalidRequest
from fedprint.tenprint import DecodedTenPrint, decode_tenprint
from fedprint.validation import ORI, TCN, Violations, check_charges, check_descriptors, check_timestamp


def check_booking_header(booking: bk.Booking) -> None:
    """Everything of a booking but its ten-print. Raises :class:`InvalidRequest` listing the bad fields."""
    violations = Violations()
    TCN.check(booking.tcn, "tcn", violations)
    ORI.check(booking.ori, "ori", violations)
    if not booking.HasField("booking_time"):
        violations.add("booking_time", "booking time is required")
    else:
        check_timestamp(booking.booking_time, "booking_time", violations)
    if not booking.charges:
        violations.add("charges", "a booking carries at least one charge")
    check_charges(booking.charges, "charges", violations)
    check_descriptors(booking.subject, "subject", violations)
    if violations:
        raise InvalidRequest(violations, "malformed booking")


def check_booking_tenprint(booking: bk.Booking) -> DecodedTenPrint:
    """Decodes the booking's ten-print; raises :class:`InvalidRequest` listing every bad finger."""
    return decode_tenprint(booking.tenprint, "tenprint")
