"""The ``fedprint.biometrics.v1.TenPrint`` wire message, decoded and checked.

Both the coordinator (booking intake) and the gallery nodes (probe intake) go
through :func:`decode_tenprint`, so a ten-print is judged the same way everywhere:
malformed data is a field violation (the request is refused), an absent or
unusable finger is a :class:`FingerIssue` (the search goes on without it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.rpc import InvalidRequest
from fedprint.validation import Violations
from minutiae.iso19794_2 import decode_template, encode_template
from minutiae.template import FingerTemplate, TemplateError, TenPrintTemplates

# Fewer minutiae than this cannot give a meaningful MCC score (too few cylinders
# reach the minimum neighbour count); such a finger is reported, not matched.
MIN_USABLE_MINUTIAE = 8
#: A ten-print has at most one entry per finger position.
MAX_FINGERS = 10
#: Largest template record accepted: one ISO/IEC 19794-2 view of 255 minutiae is 1,560 bytes; the
#: rest leaves room for an extended data block.
MAX_TEMPLATE_BYTES = 16 * 1024


#: Absences a sender may declare (NOT_SUBMITTED is the receiver's finding: the position is missing).
_DECLARED_ABSENCES = frozenset({bio.AMPUTATED, bio.UNABLE_TO_PRINT, bio.UNUSABLE})


@dataclass(frozen=True)
class FingerIssue:
    """A finger that takes no part in matching, and why."""

    position: int
    absence: bio.FingerAbsence.ValueType
    detail: str

    def to_proto(self) -> bio.FingerIssue:
        return bio.FingerIssue(
            position=bio.FingerPosition.ValueType(self.position), absence=self.absence, detail=self.detail
        )


@dataclass(frozen=True)
class DecodedTenPrint:
    """The usable fingers of a ten-print and the issues with the others."""

    templates: TenPrintTemplates
    issues: tuple[FingerIssue, ...]


def decode_tenprint(tenprint: bio.TenPrint, field: str = "tenprint") -> DecodedTenPrint:
    """Decodes every finger; raises :class:`fedprint.rpc.InvalidRequest` listing all bad fields."""
    violations = Violations()
    usable: dict[int, FingerTemplate] = {}
    issues: list[FingerIssue] = []
    seen: set[int] = set()
    if not tenprint.fingers:
        violations.add(f"{field}.fingers", "a ten-print needs at least one finger")
    if len(tenprint.fingers) > MAX_FINGERS:
        # Refused before any finger is looked at: a message of a million fingers costs nothing more.
        violations.add(f"{field}.fingers", f"{len(tenprint.fingers)} fingers, at most {MAX_FINGERS}")
        raise InvalidRequest(violations, "malformed ten-print")
    for i, finger in enumerate(tenprint.fingers):
        where = f"{field}.fingers[{i}]"
        position = int(finger.position)
        if not 1 <= position <= 10:
            violations.add(f"{where}.position", f"finger position {position} not in 1-10")
            continue
        if position in seen:
            violations.add(f"{where}.position", f"finger position {position} repeated")
            continue
        seen.add(position)
        kind = finger.WhichOneof("data")
        if kind is None:
            violations.add(where, "finger has neither template, image nor absence")
        elif kind == "absence":
            if finger.absence not in _DECLARED_ABSENCES:
                violations.add(f"{where}.absence", "absence must be AMPUTATED, UNABLE_TO_PRINT or UNUSABLE")
            else:
                issues.append(FingerIssue(position, finger.absence, "declared absent"))
        elif kind == "image":
            violations.add(
                f"{where}.image", "images are not accepted yet: send ISO/IEC 19794-2 minutiae templates"
            )
        else:
            template = _decode_template(finger.template, position, f"{where}.template", violations)
            if template is None:
                continue
            if template.count < MIN_USABLE_MINUTIAE:
                issues.append(
                    FingerIssue(
                        position,
                        bio.UNUSABLE,
                        f"{template.count} minutiae, fewer than {MIN_USABLE_MINUTIAE} needed",
                    )
                )
            else:
                usable[position] = template
    if violations:
        raise InvalidRequest(violations, "malformed ten-print")
    for position in range(1, 11):
        if position not in seen:
            issues.append(FingerIssue(position, bio.NOT_SUBMITTED, "not in the request"))
    if not usable:
        violations.add(f"{field}.fingers", "no usable finger to search with")
        raise InvalidRequest(violations, "malformed ten-print")
    issues.sort(key=lambda issue: issue.position)
    return DecodedTenPrint(TenPrintTemplates(usable), tuple(issues))


def _decode_template(
    message: bio.FingerTemplate, position: int, where: str, violations: Violations
) -> FingerTemplate | None:
    if message.format != bio.ISO_19794_2_2005:
        violations.add(f"{where}.format", "only ISO_19794_2_2005 minutiae templates are accepted")
        return None
    if len(message.data) > MAX_TEMPLATE_BYTES:
        violations.add(f"{where}.data", f"{len(message.data)} bytes, at most {MAX_TEMPLATE_BYTES}")
        return None
    try:
        template = decode_template(message.data)
    except TemplateError as error:
        violations.add(f"{where}.data", str(error))
        return None
    if template.finger_position not in (0, position):
        violations.add(
            f"{where}.data", f"record is for finger {template.finger_position}, sent as finger {position}"
        )
        return None
    return template


def tenprint_to_proto(t: TenPrintTemplates, *, absent: Mapping[int, int] | None = None) -> bio.TenPrint:
    """A ten-print message with one single-view ISO/IEC 19794-2 record per finger, by position.

    ``absent`` maps positions with no template to a :class:`FingerAbsence` value (for
    example ``UNABLE_TO_PRINT``); such fingers are listed with their reason.
    """
    absent = dict(absent or {})
    overlap = set(absent) & set(t.fingers)
    if overlap:
        raise TemplateError(f"positions {sorted(overlap)} are both present and absent")
    message = bio.TenPrint()
    for position in sorted(set(t.fingers) | set(absent)):
        finger = message.fingers.add()
        finger.position = bio.FingerPosition.ValueType(position)
        if position in absent:
            finger.absence = bio.FingerAbsence.ValueType(absent[position])
        else:
            finger.template.format = bio.ISO_19794_2_2005
            finger.template.data = encode_template(t.fingers[position])
    return message
