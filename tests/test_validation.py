"""The validators every boundary shares: full-match ASCII identifiers and codes, capped violation
lists, free text without control characters; identities read from certificates; rate limits."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.intake import check_booking_header
from federation.policy import ThreatPolicy
from fedprint.access import TokenBuckets
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.pki import ORI_URI, ROLE_URI, DevCa, Role, identity_of
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import InvalidRequest
from fedprint.validation import MAX_VIOLATIONS, NCIC_CODE, ORI, SUBJECT_ID, TCN, Violations, check_text


@pytest.mark.parametrize(
    ("identifier", "value"),
    [
        (TCN, "TCN1\n"),  # `$` would match before the newline
        (NCIC_CODE, "1201\n"),
        (NCIC_CODE, "0999\n"),  # was graded Level 3 instead of homicide
        (NCIC_CODE, "١٢٠١"),  # Arabic-Indic digits: \d and str.isdigit accept them
        (NCIC_CODE, "¹²⁰¹"),  # superscripts: str.isdigit accepts them
        (ORI, "XX0010000\n"),
        (ORI, "xx0010000"),
        (SUBJECT_ID, "UCN-0000001\n"),  # silently disabled the gallery cache
        (SUBJECT_ID, "-UCN"),
        (SUBJECT_ID, "U" * 65),
    ],
)
def test_identifiers_match_in_full_and_in_ascii_only(identifier: object, value: str) -> None:
    assert not identifier.valid(value)  # type: ignore[attr-defined]


def test_valid_identifiers_pass() -> None:
    assert TCN.valid("TCN-11-000001") and ORI.valid("XX0010000") and NCIC_CODE.valid("0999")
    assert SUBJECT_ID.valid("FIN-0000042") and SUBJECT_ID.valid("U" * 64)


def test_a_booking_with_a_newline_in_its_codes_is_refused_and_homicide_stays_level_1() -> None:
    booking = bk.Booking(tcn="TCN1\n", ori="XX0010000")
    booking.booking_time.GetCurrentTime()
    booking.charges.add(ncic_code="0999\n", literal="HOMICIDE")
    with pytest.raises(InvalidRequest) as caught:
        check_booking_header(booking)
    assert [v.field for v in caught.value.violations] == ["tcn", "charges[0].ncic_code"]
    assert ThreatPolicy.load().grade("0999").level == 1


def test_violation_lists_keep_the_first_few_and_count_the_rest() -> None:
    booking = bk.Booking(tcn="TCN-1", ori="XX0010000")
    booking.booking_time.GetCurrentTime()
    for _ in range(50):
        booking.charges.add(ncic_code="X", literal="bad\ncode")
    with pytest.raises(InvalidRequest) as caught:
        check_booking_header(booking)
    reported = caught.value.violations
    assert len(reported) == MAX_VIOLATIONS + 1
    assert reported[-1].description == f"and {100 - MAX_VIOLATIONS} more violations"
    assert len(str(caught.value)) < 4000  # the status message stays small


def test_a_charge_count_past_the_cap_is_refused_before_any_charge_is_read() -> None:
    booking = bk.Booking(tcn="TCN-1", ori="XX0010000")
    booking.booking_time.GetCurrentTime()
    booking.charges.extend(rec.Charge(ncic_code="X") for _ in range(100_000))
    with pytest.raises(InvalidRequest) as caught:
        check_booking_header(booking)
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("charges", "100000 charges, at most 50")
    ]


def test_free_text_has_no_control_characters_and_a_length_limit() -> None:
    violations = Violations()
    assert check_text("ROBBERY - BUSINESS - GUN", "literal", violations)
    assert not check_text("ROBBERY\nforged log line", "literal", violations)
    assert not check_text("X" * 201, "literal", violations)
    assert violations.count == 2


def _certificate_with(uris: list[str], ca: DevCa) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "odd")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_certificate_grants_a_role_only_when_it_names_exactly_one_known_role(tmp_path: Path) -> None:
    ca = DevCa.create(tmp_path)
    two = identity_of(_certificate_with([ROLE_URI + "ice", ROLE_URI + "coordinator"], ca))
    unknown = identity_of(_certificate_with([ROLE_URI + "superuser"], ca))
    none = identity_of(_certificate_with([], ca))
    agency_without_ori = identity_of(_certificate_with([ROLE_URI + "booking-agency"], ca))
    agency_bad_ori = identity_of(_certificate_with([ROLE_URI + "booking-agency", ORI_URI + "XX1\n"], ca))
    assert two.role is None and unknown.role is None and none.role is None
    assert agency_without_ori.role is Role.BOOKING_AGENCY and agency_without_ori.ori is None
    assert agency_bad_ori.ori is None
    # An ORI on a non-agency certificate gives it no agency's rights.
    assert identity_of(_certificate_with([ROLE_URI + "ice", ORI_URI + "XX0010000"], ca)).ori is None


def test_token_buckets_allow_a_burst_then_the_sustained_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(per_second=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("XX0010000") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("XX0010000") == pytest.approx(0.5)
    assert buckets.take("XX0020000") == 0.0  # every agency has its own bucket
    now[0] = 0.5
    assert buckets.take("XX0010000") == 0.0
