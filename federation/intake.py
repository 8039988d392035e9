"""Booking intake: what a booking must carry before anything is searched or stored.

Two steps, so that nothing is decoded for a caller who may not submit: :func:`check_booking_header`
(identifiers, codes, counts and text, all cheap), then the coordinator checks the ORI against
the caller's certificate, then :func:`check_booking_tenprint` decodes the templates.
"""

from __future__ import annotations

import hashlib
import json

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


#: The parts of a booking that a resubmission of its TCN must repeat exactly.
BOOKING_PARTS = ("ori", "booking_time", "subject", "charges", "tenprint")


def _part_bytes(booking: bk.Booking, part: str) -> bytes:
    only = bk.Booking()
    if part == "ori":
        only.ori = booking.ori
    elif part == "charges":
        only.charges.extend(booking.charges)
    else:
        getattr(only, part).CopyFrom(getattr(booking, part))
    return only.SerializeToString(deterministic=True)


def booking_content(booking: bk.Booking) -> str:
    """Digests of each part of a booking (JSON), stored with its decision."""
    return json.dumps(
        {part: hashlib.sha256(_part_bytes(booking, part)).hexdigest() for part in BOOKING_PARTS},
        sort_keys=True,
    )


def changed_parts(stored_content: str, booking: bk.Booking) -> list[str]:
    """The parts in which ``booking`` differs from the booking whose digests were stored
    (empty when it is the same booking, or when nothing was stored to compare with)."""
    if not stored_content:
        return []
    stored = json.loads(stored_content)
    now = json.loads(booking_content(booking))
    return [part for part in BOOKING_PARTS if stored.get(part) != now[part]]
