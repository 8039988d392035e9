"""Booking intake: what a booking must carry before anything is searched or stored."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection

from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.rpc import FieldViolation, InvalidRequest
from fedprint.tenprint import DecodedTenPrint, decode_tenprint

TCN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
ORI = re.compile(r"^[A-Za-z0-9]{9}$")
NCIC_CODE = re.compile(r"^\d{4}$")
MAX_CHARGES = 50


class UnauthorizedOri(PermissionError):
    """The booking's ORI may not submit to this coordinator."""


def check_booking(booking: bk.Booking, authorized_oris: Collection[str]) -> DecodedTenPrint:
    """Validates a booking.

    Raises :class:`InvalidRequest` listing every bad field, then :class:`UnauthorizedOri`.
    """
    violations: list[FieldViolation] = []
    if not TCN.match(booking.tcn):
        violations.append(FieldViolation("tcn", "1-64 letters, digits or _.:- starting alphanumeric"))
    if not ORI.match(booking.ori):
        violations.append(FieldViolation("ori", "an ORI is nine letters or digits"))
    if not booking.HasField("booking_time"):
        violations.append(FieldViolation("booking_time", "booking time is required"))
    if not booking.charges:
        violations.append(FieldViolation("charges", "a booking carries at least one charge"))
    if len(booking.charges) > MAX_CHARGES:
        violations.append(FieldViolation("charges", f"{len(booking.charges)} charges, at most {MAX_CHARGES}"))
    for i, charge in enumerate(booking.charges):
        if not NCIC_CODE.match(charge.ncic_code):
            violations.append(
                FieldViolation(
                    f"charges[{i}].ncic_code", f"NCIC offense code {charge.ncic_code!r} is not four digits"
                )
            )
    decoded: DecodedTenPrint | None = None
    try:
        decoded = decode_tenprint(booking.tenprint, "tenprint")
    except InvalidRequest as error:
        violations.extend(error.violations)
    if violations or decoded is None:
        raise InvalidRequest(violations, "malformed booking")
    if authorized_oris and booking.ori not in authorized_oris:
        raise UnauthorizedOri(f"ORI {booking.ori} is not authorised to submit bookings")
    return decoded


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
