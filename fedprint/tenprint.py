"""The ``fedprint.biometrics.v1.TenPrint`` wire message, decoded and checked.

Both the coordinator (booking intake) and the gallery nodes (probe intake) go
through :func:`decode_tenprint`, so a ten-print is judged the same way everywhere:
malformed data is a field violation (the request is refused), an absent or
unusable finger is a :class:`FingerIssue` (the search goes on without it).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.rpc import FieldViolation, InvalidRequest
from minutiae.iso19794_2 import decode_template
from minutiae.template import FingerTemplate, TemplateError, TenPrintTemplates

# Fewer minutiae than this cannot give a meaningful MCC score (too few cylinders
# reach the minimum neighbour count); such a finger is reported, not matched.
MIN_USABLE_MINUTIAE = 8


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
    violations: list[FieldViolation] = []
    usable: dict[int, FingerTemplate] = {}
    issues: list[FingerIssue] = []
    seen: set[int] = set()
    if not tenprint.fingers:
        violations.append(FieldViolation(f"{field}.fingers", "a ten-print needs at least one finger"))
    for i, finger in enumerate(tenprint.fingers):
        where = f"{field}.fingers[{i}]"
        position = int(finger.position)
        if not 1 <= position <= 10:
            violations.append(FieldViolation(f"{where}.position", f"finger position {position} not in 1-10"))
            continue
        if position in seen:
            violations.append(FieldViolation(f"{where}.position", f"finger position {position} repeated"))
            continue
        seen.add(position)
        kind = finger.WhichOneof("data")
        if kind is None:
            violations.append(FieldViolation(where, "finger has neither template, image nor absence"))
        elif kind == "absence":
            if finger.absence == bio.FINGER_ABSENCE_UNSPECIFIED:
                violations.append(FieldViolation(f"{where}.absence", "absence reason must be set"))
            else:
                issues.append(FingerIssue(position, finger.absence, "declared absent"))
        elif kind == "image":
            violations.append(
                FieldViolation(
                    f"{where}.image", "images are not accepted yet: send ISO/IEC 19794-2 minutiae templates"
                )
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
        raise InvalidRequest([FieldViolation(f"{field}.fingers", "no usable finger to search with")])
    issues.sort(key=lambda issue: issue.position)
    return DecodedTenPrint(TenPrintTemplates(usable), tuple(issues))


def _decode_template(
    message: bio.FingerTemplate, position: int, where: str, violations: list[FieldViolation]
) -> FingerTemplate | None:
    if message.format != bio.ISO_19794_2_2005:
        violations.append(
            FieldViolation(f"{where}.format", "only ISO_19794_2_2005 minutiae templates are accepted")
        )
        return None
    try:
        template = decode_template(message.data)
    except TemplateError as error:
        violations.append(FieldViolation(f"{where}.data", str(error)))
        return None
    if template.finger_position not in (0, position):
        violations.append(
            FieldViolation(
                f"{where}.data", f"record is for finger {template.finger_position}, sent as finger {position}"
            )
        )
        return None
    return template
