"""The threat policy: offense codes to levels, booking levels, notification decisions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from federation.policy import PolicyConfig, ThreatPolicy
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.records.v1 import records_pb2 as rec


@pytest.fixture(scope="module")
def policy() -> ThreatPolicy:
    return ThreatPolicy.load()


@pytest.mark.parametrize(
    ("code", "level", "category"),
    [
        ("0911", 1, "homicide"),
        ("1099", 1, "kidnapping"),
        ("1102", 1, "sexual assault"),
        ("1201", 1, "robbery"),
        ("1315", 1, "aggravated assault"),
        ("3562", 1, "dangerous drugs"),
        ("2001", 2, "arson"),
        ("2299", 2, "burglary"),
        ("2399", 2, "larceny"),
        ("2404", 2, "stolen vehicle"),
        ("2699", 2, "fraud"),
        ("1313", 3, "lesser offense"),  # simple assault
        ("5404", 3, "lesser offense"),  # driving under the influence
        ("7399", 3, "lesser offense"),
    ],
)
def test_offense_codes_map_to_configured_levels(
    policy: ThreatPolicy, code: str, level: int, category: str
) -> None:
    grade = policy.grade(code)
    assert (grade.level, grade.category) == (level, category)


def history(*arrests: tuple[str, int]) -> rec.CriminalHistory:
    h = rec.CriminalHistory(subject_id="UCN-0000001")
    for code, disposition in arrests:
        h.arrests.add(
            charges=[rec.Charge(ncic_code=code)], disposition=rec.Disposition.ValueType(disposition)
        )
    return h


def test_booking_level_is_the_most_severe_of_charges_and_convictions(policy: ThreatPolicy) -> None:
    charges = [rec.Charge(ncic_code="5404"), rec.Charge(ncic_code="2299")]
    assert policy.booking_level(charges, None)[0] == rec.LEVEL_2
    convicted_robbery = history(("1201", rec.CONVICTED))
    level, reasons = policy.booking_level(charges, convicted_robbery)
    assert level == rec.LEVEL_1
    assert "1201" in reasons[0] and "convicted" in reasons[0]


def test_dismissed_and_pending_arrests_do_not_raise_the_level(policy: ThreatPolicy) -> None:
    charges = [rec.Charge(ncic_code="5311")]
    h = history(("0911", rec.DISMISSED), ("1201", rec.PENDING), ("1201", rec.ACQUITTED))
    assert policy.booking_level(charges, h)[0] == rec.LEVEL_3


def node(
    name: str,
    band: int,
    record: rec.CriminalHistory | rec.ImmigrationHistory | None = None,
    *,
    fingers: int = 10,
    agreeing: int | None = None,
) -> bk.NodeResult:
    """A node's answer with one candidate compared on ``fingers`` fingers, of which ``agreeing``
    (default: all) carry positive evidence on their own."""
    agreeing = fingers if agreeing is None else agreeing
    result = bk.NodeResult(node=name, outcome=bk.ANSWERED, band=bio.DecisionBand.ValueType(band))
    result.thresholds.hit = 0.3
    if band != bio.NO_HIT:
        candidate = gal.Candidate(
            subject_id=f"{name}-1", rank=1, fused_score=0.5, band=bio.DecisionBand.ValueType(band)
        )
        for position in range(1, fingers + 1):
            candidate.finger_scores.add(
                position=bio.FingerPosition.ValueType(position),
                score=0.5,
                llr=2.0 if position <= agreeing else -3.0,
            )
        if isinstance(record, rec.CriminalHistory):
            candidate.criminal_history.CopyFrom(record)
        elif isinstance(record, rec.ImmigrationHistory):
            candidate.immigration_history.CopyFrom(record)
        result.candidates.append(candidate)
    return result


ENCOUNTERED = rec.ImmigrationHistory(subject_id="FIN-1", status=rec.OVERSTAY)
CITIZEN = rec.ImmigrationHistory(subject_id="FIN-2", status=rec.NATURALIZED_CITIZEN)


def test_ident_hit_is_notified_with_the_level(policy: ThreatPolicy) -> None:
    outcome = policy.decide(
        [rec.Charge(ncic_code="5404")],
        node("iafis", bio.HIT, history(("3562", rec.CONVICTED))),
        node("ident", bio.HIT, ENCOUNTERED),
    )
    assert outcome.notification == bk.QUEUED
    assert outcome.level == rec.LEVEL_1
    assert any("IDENT hit" in r for r in outcome.reasons)


def test_iafis_only_hit_is_not_notified(policy: ThreatPolicy) -> None:
    outcome = policy.decide(
        [rec.Charge(ncic_code="1201")], node("iafis", bio.HIT, history()), node("ident", bio.NO_HIT)
    )
    assert (outcome.notification, outcome.level) == (bk.NOT_REQUIRED, rec.LEVEL_1)


def test_review_band_goes_to_an_examiner_not_to_ice(policy: ThreatPolicy) -> None:
    outcome = policy.decide(
        [rec.Charge(ncic_code="1201")], node("iafis", bio.NO_HIT), node("ident", bio.REVIEW, ENCOUNTERED)
    )
    assert outcome.notification == bk.EXAMINER_REVIEW


def test_iafis_review_does_not_use_the_criminal_history(policy: ThreatPolicy) -> None:
    outcome = policy.decide(
        [rec.Charge(ncic_code="5404")],
        node("iafis", bio.REVIEW, history(("0911", rec.CONVICTED))),
        node("ident", bio.NO_HIT),
    )
    assert outcome.level == rec.LEVEL_3


def test_citizen_hit_is_suppressed_and_says_why(policy: ThreatPolicy) -> None:
    outcome = policy.decide(
        [rec.Charge(ncic_code="1201")], node("iafis", bio.NO_HIT), node("ident", bio.HIT, CITIZEN)
    )
    assert outcome.notification == bk.SUPPRESSED
    assert any("U.S. citizen" in r for r in outcome.reasons)


def test_a_silent_node_defers_the_decision(policy: ThreatPolicy) -> None:
    silent = bk.NodeResult(node="iafis", outcome=bk.TIMED_OUT)
    outcome = policy.decide([rec.Charge(ncic_code="1201")], silent, node("ident", bio.HIT, ENCOUNTERED))
    assert outcome.notification == bk.DEFERRED
    assert any("iafis did not answer" in r for r in outcome.reasons)


def test_overlapping_ranges_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text(
        "version: x\ndefault_level: 3\nlevels:\n"
        "  1: [{from: '1200', to: '1299', category: robbery}]\n"
        "  2: [{from: '1250', to: '1260', category: oops}]\n"
    )
    with pytest.raises(ValidationError, match="overlap"):
        ThreatPolicy.load(bad)


def test_policy_is_versioned_config_not_code(tmp_path: Path) -> None:
    custom = tmp_path / "policy.yaml"
    custom.write_text(
        "version: test-2\ndefault_level: 2\nlevels: {1: [{from: '5400', to: '5499', category: traffic}]}\n"
    )
    policy = ThreatPolicy.load(custom)
    assert policy.version == "test-2"
    assert policy.grade("5404").level == 1
    assert policy.grade("2299").level == 2
    assert isinstance(policy.config, PolicyConfig)


def test_a_hit_on_too_few_fingers_goes_to_an_examiner_not_to_ice(policy: ThreatPolicy) -> None:
    needed = policy.config.evidence.min_fingers_compared
    ident = node("ident", bio.HIT, ENCOUNTERED, fingers=1)
    iafis = node("iafis", bio.HIT, history(("0999", rec.CONVICTED)), fingers=needed - 1)
    outcome = policy.decide([rec.Charge(ncic_code="5404")], iafis, ident)
    assert outcome.notification == bk.EXAMINER_REVIEW
    assert ident.band == ident.candidates[0].band == bio.REVIEW  # the decision shows what was acted on
    assert iafis.band == bio.REVIEW
    assert outcome.level == rec.LEVEL_3  # the IAFIS conviction is not used on such a match
    assert any("1 of 1 finger compared agreeing" in r and "examiner review" in r for r in outcome.reasons)

    full = node("ident", bio.HIT, ENCOUNTERED, fingers=needed)
    assert policy.decide([rec.Charge(ncic_code="5404")], node("iafis", bio.NO_HIT), full).notification == (
        bk.QUEUED
    )


def test_a_hit_carried_by_one_copied_finger_among_strangers_is_not_automated(policy: ThreatPolicy) -> None:
    # One finger copied from an IDENT subject and three fingers of people in neither gallery: four
    # fingers compared, and a fused score past the hit threshold, but only one finger agrees.
    needed = policy.config.evidence.min_fingers_compared
    copied = node("ident", bio.HIT, ENCOUNTERED, fingers=needed, agreeing=1)
    outcome = policy.decide([rec.Charge(ncic_code="5404")], node("iafis", bio.NO_HIT), copied)
    assert outcome.notification == bk.EXAMINER_REVIEW and copied.band == bio.REVIEW
    assert any(f"with 1 of {needed} fingers compared agreeing" in r for r in outcome.reasons)

    agreed = node("ident", bio.HIT, ENCOUNTERED, fingers=10, agreeing=needed)
    outcome = policy.decide([rec.Charge(ncic_code="5404")], node("iafis", bio.NO_HIT), agreed)
    assert outcome.notification == bk.QUEUED
    assert any(f"{needed} of 10 fingers agreeing" in r for r in outcome.reasons)  # the reason says how many
