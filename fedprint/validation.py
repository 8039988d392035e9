"""What every boundary checks the same way: identifiers and codes, free text, timestamps, and
the violation list a refused request carries.

Identifiers and codes are matched in full against ASCII patterns (``re.fullmatch`` with explicit
``[0-9]`` classes): ``$`` would also match before a trailing newline, and ``\\d`` or ``str.isdigit``
would accept non-ASCII digits, so ``"1201\\n"`` or ``"١٢٠١"`` would pass as an offense code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from fedprint.records.v1 import records_pb2 as rec

#: Field violations a refused request reports in full; the rest are counted in one last entry.
MAX_VIOLATIONS = 20


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: where it is (``tenprint.fingers[3].template``) and why."""

    field: str
    description: str


class Violations:
    """The violations found in one request: the first :data:`MAX_VIOLATIONS` in full, the rest
    only counted, so a message of a million bad entries costs a counter, not a million strings."""

    def __init__(self, limit: int = MAX_VIOLATIONS) -> None:
        self.limit = limit
        self.items: list[FieldViolation] = []
        self.more = 0

    def add(self, field: str, description: str) -> None:
        if len(self.items) < self.limit:
            self.items.append(FieldViolation(field, description))
        else:
            self.more += 1

    def extend(self, found: Iterable[FieldViolation]) -> None:
        for violation in found:
            self.add(violation.field, violation.description)

    @property
    def count(self) -> int:
        return len(self.items) + self.more

    def __bool__(self) -> bool:
        return self.count > 0

    def reported(self) -> list[FieldViolation]:
        """What the client is told: the first violations, then how many more there were."""
        if not self.more:
            return list(self.items)
        return [*self.items, FieldViolation("", f"and {self.more} more violations")]


@dataclass(frozen=True)
class Identifier:
    """An identifier or code with a fixed ASCII syntax."""

    name: str
    pattern: re.Pattern[str]
    #: What a valid value looks like, for the violation's description.
    syntax: str

    def valid(self, value: str) -> bool:
        return self.pattern.fullmatch(value) is not None

    def check(self, value: str, field: str, violations: Violations) -> bool:
        """Adds a violation unless ``value`` is valid; returns whether it was."""
        if self.valid(value):
            return True
        violations.add(field, f"{self.name} {shown(value)} is not {self.syntax}")
        return False


def _ascii(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII)


#: Transaction control number: the agency's idempotency key for a booking. At most 54 characters
#: (an EBTS TCN has at most 40), so that a booking's key, ``ORI/TCN``, fits 64.
TCN = Identifier(
    "TCN", _ascii(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,53}"), "1-54 of A-Z a-z 0-9 _.:- starting alphanumeric"
)
#: Originating agency identifier: nine upper-case letters or digits (two-letter state code, seven more).
ORI = Identifier("ORI", _ascii(r"[A-Z0-9]{9}"), "nine upper-case letters or digits")


def booking_key(ori: str, tcn: str) -> str:
    """A booking's identity, ``ORI/TCN``: a TCN is its agency's own, so two agencies may use the
    same one, and what one agency sends never meets another's booking. (Neither an ORI nor a
    TCN holds a ``/``.)"""
    return f"{ori}/{tcn}"


def booking_of(key: str) -> tuple[str, str]:
    """The ORI and TCN of a booking's key (:func:`booking_key`)."""
    ori, _, tcn = key.partition("/")
    return ori, tcn


#: NCIC uniform offense code.
NCIC_CODE = Identifier("NCIC offense code", _ascii(r"[0-9]{4}"), "four digits 0-9")
#: An enrolled subject's identifier in a gallery (UCN, FIN), and a probe's identifier in a search.
SUBJECT_ID = Identifier(
    "subject id",
    _ascii(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"),
    "1-64 of A-Z a-z 0-9 _.:- starting alphanumeric",
)
PROBE_ID = Identifier(
    "probe id", _ascii(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"), "1-64 of A-Z a-z 0-9 _.:- starting alphanumeric"
)
#: An immigration encounter's identifier, and the port or station code where it happened.
ENCOUNTER_ID = Identifier(
    "encounter id",
    _ascii(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"),
    "1-64 of A-Z a-z 0-9 _.:- starting alphanumeric",
)
LOCATION = Identifier(
    "location code", _ascii(r"[A-Z0-9][A-Z0-9-]{0,31}"), "1-32 of A-Z 0-9 - starting alphanumeric"
)
#: ISO 3166-1 alpha-2 country code.
COUNTRY = Identifier("country code", _ascii(r"[A-Z]{2}"), "two upper-case letters")
SEX = Identifier("sex", _ascii(r"[MFX]"), "M, F or X")

#: Longest free text (a charge literal, a reason) accepted anywhere.
MAX_TEXT = 200
#: Seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range google.protobuf.Timestamp allows.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def shown(value: str, limit: int = 40) -> str:
    """A value quoted for an error message: escaped (no control characters reach a log line) and
    cut to ``limit`` characters."""
    quoted = ascii(value[:limit])
    return quoted + ("..." if len(value) > limit else "")


def check_text(value: str, field: str, violations: Violations, *, limit: int = MAX_TEXT) -> bool:
    """Free text: at most ``limit`` characters, none of them a control character (a newline in a
    charge literal could forge a line in a log or a report)."""
    if len(value) > limit:
        violations.add(field, f"{len(value)} characters, at most {limit}")
        return False
    if not value.isprintable():
        violations.add(field, "control characters are not allowed")
        return False
    return True


def check_timestamp(value: timestamp_pb2.Timestamp, field: str, violations: Violations) -> bool:
    """A timestamp inside the range google.protobuf.Timestamp defines (0001-9999), nanos in range."""
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos <= 999_999_999:
        violations.add(field, "timestamp outside 0001-01-01 to 9999-12-31 or nanos outside 0-999999999")
        return False
    return True


def check_count(items: int, limit: int, field: str, violations: Violations, what: str) -> bool:
    """At most ``limit`` entries in a repeated field; checked before the entries are looked at."""
    if items > limit:
        violations.add(field, f"{items} {what}, at most {limit}")
        return False
    return True


#: Charges on one booking or one arrest.
MAX_CHARGES = 50
#: Counts of one charge.
MAX_COUNTS = 999


def check_charges(charges: Sequence[rec.Charge], field: str, violations: Violations) -> None:
    """Charges: at most :data:`MAX_CHARGES`, each a four-digit NCIC code, a printable literal of at
    most :data:`MAX_TEXT` characters, and at most :data:`MAX_COUNTS` counts."""
    if not check_count(len(charges), MAX_CHARGES, field, violations, "charges"):
        return
    for i, charge in enumerate(charges):
        NCIC_CODE.check(charge.ncic_code, f"{field}[{i}].ncic_code", violations)
        check_text(charge.literal, f"{field}[{i}].literal", violations)
        if charge.counts > MAX_COUNTS:
            violations.add(f"{field}[{i}].counts", f"{charge.counts} counts, at most {MAX_COUNTS}")


def check_descriptors(d: rec.SubjectDescriptors, field: str, violations: Violations) -> None:
    """Synthetic subject descriptors: each field empty (zero) or well-formed."""
    if d.sex:
        SEX.check(d.sex, f"{field}.sex", violations)
    if d.place_of_birth:
        COUNTRY.check(d.place_of_birth, f"{field}.place_of_birth", violations)
    if d.year_of_birth and not 1900 <= d.year_of_birth <= 2100:
        violations.add(f"{field}.year_of_birth", f"year {d.year_of_birth} outside 1900-2100")
    if d.height_cm and not 30 <= d.height_cm <= 275:
        violations.add(f"{field}.height_cm", f"{d.height_cm} cm outside 30-275")
