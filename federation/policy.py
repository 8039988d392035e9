"""The threat-priority policy: offense codes to levels, the level of a booking, and
what a decision means for notification. Loaded from a versioned YAML file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.records.v1 import records_pb2 as rec

BUNDLED_POLICY = "threat_policy.yaml"


class CodeRange(BaseModel):
    # Rust regex (pydantic): \d would take any Unicode digit; $ is the end of the text there.
    start: str = Field(alias="from", pattern=r"^[0-9]{4}$")
    end: str = Field(alias="to", pattern=r"^[0-9]{4}$")
    category: str

    @model_validator(mode="after")
    def _ordered(self) -> CodeRange:
        if self.start > self.end:
            raise ValueError(f"range {self.start}-{self.end} is reversed")
        return self

    def contains(self, code: str) -> bool:
        return self.start <= code <= self.end


class SuppressionRule(BaseModel):
    status: str
    reason: str

    @field_validator("status")
    @classmethod
    def _known_status(cls, status: str) -> str:
        rec.ImmigrationStatus.Value(status)  # raises on an unknown name
        return status


class EvidenceRule(BaseModel):
    """What an automated HIT needs besides its fused score: at least ``min_fingers_compared``
    fingers that each agree on their own, i.e. whose per-finger log-likelihood ratio is above 0
    (that finger alone is likelier the same finger of the same person than another's). A
    candidate that reaches the hit threshold with fewer goes to an examiner instead.

    Why agreeing fingers and not fingers compared: a fused score is a sum, so one finger copied
    from a subject (or one strong chance match of a small, low-minutia finger) can carry it past
    the threshold while the other fingers compared say "someone else"; counting the fingers
    present would call that a ten-print hit. Why above 0 rather than a higher bar: an impostor
    finger rarely has a positive ratio, so several of them together are rare, and a mate's
    fingers mostly do, so a true ten-print hit keeps its automation."""

    min_fingers_compared: int = Field(
        default=4, ge=1, le=10, description="fingers that must each agree (LLR > 0) for an automated HIT"
    )


class PolicyConfig(BaseModel):
    version: str
    evidence: EvidenceRule = EvidenceRule()
    default_level: int = Field(ge=1, le=3)
    levels: dict[int, list[CodeRange]]
    count_dispositions: list[str] = ["CONVICTED"]
    suppress: list[SuppressionRule] = []

    @model_validator(mode="after")
    def _no_overlaps(self) -> PolicyConfig:
        ranges = sorted((r.start, r.end, level) for level, rs in self.levels.items() for r in rs)
        for (s1, e1, l1), (s2, e2, l2) in itertools.pairwise(ranges):
            if s2 <= e1:
                raise ValueError(f"ranges {s1}-{e1} (level {l1}) and {s2}-{e2} (level {l2}) overlap")
        for level in self.levels:
            if level not in (1, 2, 3):
                raise ValueError(f"level {level} is not 1, 2 or 3")
        for name in self.count_dispositions:
            rec.Disposition.Value(name)
        return self


@dataclass(frozen=True)
class Grade:
    """The level of one charge and why."""

    code: str
    level: int
    category: str


@dataclass(frozen=True)
class PolicyOutcome:
    """What the policy makes of a booking's search results."""

    level: rec.ThreatLevel.ValueType
    notification: bk.NotificationState.ValueType
    #: Every reason, for ICE, examiners and audit.
    reasons: list[str]
    #: The reasons the booking agency may read: its IAFIS result, the level, completeness; never
    #: anything of IDENT (see :func:`federation.disclosure.agency_view`).
    agency_reasons: list[str] = field(default_factory=list)


def agreeing_fingers(candidate: gal.Candidate) -> int:
    """Fingers of ``candidate`` whose own log-likelihood ratio favours identity (above 0)."""
    return sum(1 for finger in candidate.finger_scores if finger.llr > 0.0)


class ThreatPolicy:
    """Grades charges and decides on notification, as configured."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.version = config.version
        self._counted = {rec.Disposition.Value(name) for name in config.count_dispositions}
        self._suppress = {rec.ImmigrationStatus.Value(r.status): r.reason for r in config.suppress}

    @classmethod
    def load(cls, path: Path | None = None) -> ThreatPolicy:
        """Reads ``path``, or the policy bundled with the package."""
        source = Path(path) if path is not None else Path(__file__).with_name(BUNDLED_POLICY)
        return cls(PolicyConfig.model_validate(yaml.safe_load(source.read_text())))

    def grade(self, code: str) -> Grade:
        """The level of one NCIC offense code."""
        for level in sorted(self.config.levels):
            for r in self.config.levels[level]:
                if r.contains(code):
                    return Grade(code, level, r.category)
        return Grade(code, self.config.default_level, "lesser offense")

    def booking_level(
        self, charges: Iterable[rec.Charge], history: rec.CriminalHistory | None
    ) -> tuple[rec.ThreatLevel.ValueType, list[str]]:
        """Most severe level of the current charges and the counted arrests of ``history``."""
        graded: list[tuple[Grade, str]] = [(self.grade(c.ncic_code), "current charge") for c in charges]
        if history is not None:
            for arrest in history.arrests:
                if arrest.disposition in self._counted:
                    disposition = rec.Disposition.Name(arrest.disposition).lower()
                    graded += [(self.grade(c.ncic_code), f"{disposition} arrest") for c in arrest.charges]
        if not graded:
            return rec.THREAT_LEVEL_UNSPECIFIED, ["no charge or counted conviction to grade"]
        worst, source = min(graded, key=lambda g: g[0].level)
        reason = f"level {worst.level}: {source} {worst.code} ({worst.category})"
        return rec.ThreatLevel.Value(f"LEVEL_{worst.level}"), [reason]

    def weigh_evidence(self, node: bk.NodeResult) -> str | None:
        """Lowers a node's HIT to REVIEW (on ``node`` and its top candidate) when fewer of its
        fingers agree than the evidence rule asks (see :class:`EvidenceRule`); returns the
        reason, None when the hit stands."""
        if node.outcome != bk.ANSWERED or node.band != bio.HIT or not node.candidates:
            return None
        top = node.candidates[0]
        compared, agreeing = len(top.finger_scores), agreeing_fingers(top)
        needed = self.config.evidence.min_fingers_compared
        if agreeing >= needed:
            return None
        node.band = top.band = bio.REVIEW
        return (
            f"{node.node.upper()} candidate {top.subject_id} reached the hit threshold with {agreeing} of "
            f"{compared} finger{'s' if compared != 1 else ''} compared agreeing, fewer than the {needed} "
            "an automated hit needs: examiner review"
        )

    def decide(
        self, charges: Iterable[rec.Charge], iafis: bk.NodeResult, ident: bk.NodeResult
    ) -> PolicyOutcome:
        """Level, notification state and reasons for a booking's two node results. A HIT that
        fails the evidence rule is lowered to REVIEW on the results given (see
        :meth:`weigh_evidence`), so the decision shows the band the policy acted on."""
        # Reasons about IAFIS, the level and completeness are the agency's too; those about IDENT
        # are not (an agency learns only whether the booking was referred to ICE), nor the nodes'
        # own errors, which name the services' hosts.
        iafis_evidence = self.weigh_evidence(iafis)
        ident_evidence = self.weigh_evidence(ident)
        agency = [iafis_evidence] if iafis_evidence is not None else []
        reasons = list(agency)
        complete = True
        for node in (iafis, ident):
            if node.outcome == bk.PARTIAL:
                complete = False
                reasons.append(f"{node.node} answered only in part ({node.error}): decision incomplete")
                agency.append(f"{node.node} answered only in part: decision incomplete")
            elif node.outcome != bk.ANSWERED:
                complete = False
                why = f"{node.node} did not answer ({bk.NodeOutcome.Name(node.outcome)}): decision incomplete"
                reasons.append(why)
                agency.append(why)
        history = None
        iafis_reasons = []
        if iafis.outcome == bk.ANSWERED and iafis.band == bio.HIT and iafis.candidates:
            top = iafis.candidates[0]
            history = top.criminal_history
            iafis_reasons.append(
                f"IAFIS hit {top.subject_id} (score {top.fused_score:.3f}, "
                f"{agreeing_fingers(top)} of {len(top.finger_scores)} fingers agreeing)"
            )
        elif iafis.outcome == bk.ANSWERED and iafis.band == bio.REVIEW:
            iafis_reasons.append(
                "IAFIS candidate in the review band: criminal history not used until an examiner verifies"
            )
        level, level_reasons = self.booking_level(charges, history)
        agency += [*iafis_reasons, *level_reasons]
        reasons += [*iafis_reasons, *level_reasons]
        if ident_evidence is not None:
            reasons.append(ident_evidence)
        if not complete:
            return PolicyOutcome(level, bk.DEFERRED, reasons, agency)
        if ident.band == bio.HIT and ident.candidates:
            top = ident.candidates[0]
            reasons.append(
                f"IDENT hit {top.subject_id} (score {top.fused_score:.3f} >= {ident.thresholds.hit:.3f}, "
                f"{agreeing_fingers(top)} of {len(top.finger_scores)} fingers agreeing)"
            )
            return self.ident_identity(level, top.immigration_history, reasons, agency)
        if ident.band == bio.REVIEW:
            reasons.append(
                "IDENT candidate in the review band: examiner verification before any notification"
            )
            return PolicyOutcome(level, bk.EXAMINER_REVIEW, reasons, agency)
        reasons.append("no IDENT hit: no notification")
        return PolicyOutcome(level, bk.NOT_REQUIRED, reasons, agency)

    def ident_identity(
        self,
        level: rec.ThreatLevel.ValueType,
        record: rec.ImmigrationHistory,
        reasons: list[str],
        agency_reasons: list[str] | None = None,
    ) -> PolicyOutcome:
        """What an established IDENT identity means for notification, whoever established it: an
        automated HIT or an examiner's confirmation of a review-band match. The examiner
        confirms who the person is; the policy, not the examiner, decides what follows
        (suppression rules apply alike). ``reasons`` are extended and returned; the agency's
        (``agency_reasons``) gain nothing: a suppression names an immigration status."""
        agency = list(agency_reasons or [])
        suppressed = self._suppress.get(record.status)
        if suppressed is not None:
            reasons.append(f"notification suppressed: {suppressed}")
            return PolicyOutcome(level, bk.SUPPRESSED, reasons, agency)
        return PolicyOutcome(level, bk.QUEUED, reasons, agency)
