"""ISO/IEC 19794-2:2005 and NIST .xyt: round trips, the byte layout, and malformed input."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minutiae import (
    ANGLE_ERROR_BOUND_DEGREES,
    FingerTemplate,
    MinutiaKind,
    TemplateError,
    decode_record,
    decode_template,
    encode_record,
    encode_template,
    read_xyt,
    write_xyt,
)


def angle_error_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.mod(a.astype(np.float64) - b.astype(np.float64) + math.pi, 2 * math.pi) - math.pi
    return np.abs(np.rad2deg(d))


@st.composite
def templates(draw, *, width=None, height=None, ppi=None, position=None, impression=None, max_minutiae=255):
    width = width or draw(st.integers(16, 2000))
    height = height or draw(st.integers(16, 2000))
    n = draw(st.integers(1, max_minutiae))
    xs = draw(st.lists(st.integers(0, width - 1), min_size=n, max_size=n))
    ys = draw(st.lists(st.integers(0, height - 1), min_size=n, max_size=n))
    thetas = draw(st.lists(st.floats(0, 2 * math.pi, exclude_max=True), min_size=n, max_size=n))
    return FingerTemplate.from_arrays(
        np.stack([xs, ys, thetas], axis=1),
        width=width,
        height=height,
        kinds=draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)),
        quality=draw(st.lists(st.integers(0, 100), min_size=n, max_size=n)),
        resolution_ppi=ppi or draw(st.sampled_from([250, 300, 333, 500, 600, 1000])),
        finger_position=draw(st.integers(0, 10)) if position is None else position,
        impression=draw(st.integers(0, 15)) if impression is None else impression,
        finger_quality=draw(st.integers(0, 100)),
    )


def assert_same_except_angles(decoded: FingerTemplate, original: FingerTemplate, bound: float) -> None:
    np.testing.assert_array_equal(decoded.minutiae[:, :2], original.minutiae[:, :2])
    assert angle_error_degrees(decoded.minutiae[:, 2], original.minutiae[:, 2]).max() <= bound + 1e-3
    np.testing.assert_array_equal(decoded.quality, original.quality)
    assert (decoded.width, decoded.height) == (original.width, original.height)
    assert decoded.finger_position == original.finger_position


# --- ISO/IEC 19794-2 ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(templates())
def test_iso_round_trip_keeps_positions_and_angles_within_the_bound(t: FingerTemplate) -> None:
    back = decode_template(encode_template(t))
    assert_same_except_angles(back, t, ANGLE_ERROR_BOUND_DEGREES)
    np.testing.assert_array_equal(back.kinds, t.kinds)
    assert back.impression == t.impression
    assert back.finger_quality == t.finger_quality
    if t.resolution_ppi % 10 == 0:
        assert back.resolution_ppi == t.resolution_ppi
    else:
        assert abs(back.resolution_ppi - t.resolution_ppi) <= 2


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_iso_multi_finger_record_round_trips_every_view_in_order(data: st.DataObject) -> None:
    keys = data.draw(
        st.lists(st.tuples(st.integers(0, 10), st.integers(0, 15)), min_size=1, max_size=12, unique=True)
    )
    # Up to 12 views of up to 255 minutiae each overran Hypothesis's data budget now and then
    # (FailedHealthCheck); the single-view test above covers full-size views.
    views = [
        data.draw(templates(width=400, height=500, ppi=500, position=p, impression=i, max_minutiae=60))
        for p, i in keys
    ]
    record = encode_record(views)
    assert struct.unpack(">I", record[8:12])[0] == len(record)
    assert record[22] == len(views)
    back = decode_record(record)
    assert len(back) == len(views)
    for b, v in zip(back, views, strict=True):
        assert_same_except_angles(b, v, ANGLE_ERROR_BOUND_DEGREES)
        assert b.impression == v.impression


def test_angle_quantisation_error_bound_is_half_a_step() -> None:
    # Worst case: exactly half-way between two codes.
    half_step = 2 * math.pi / 512
    t = FingerTemplate.from_arrays([[1, 1, half_step * 3], [2, 2, 2 * math.pi - 1e-6]], width=10, height=10)
    back = decode_template(encode_template(t))
    errors = angle_error_degrees(back.minutiae[:, 2], t.minutiae[:, 2])
    assert errors.max() <= ANGLE_ERROR_BOUND_DEGREES + 1e-4
    assert math.isclose(ANGLE_ERROR_BOUND_DEGREES, 0.703125)


# The record the standard's layout describes, written out byte by byte (not by our encoder):
# 400x500 image, 197 px/cm (500 ppi), one view of finger 2 (right index), view 0, live-scan
# plain, finger quality 80, two minutiae, no extended data.
HAND_BUILT = bytes.fromhex(
    "464d5200"  # "FMR\0"
    "20323000"  # " 20\0"
    "0000002a"  # record length 42 = 24 + 4 + 2*6 + 2
    "0000"  # capture equipment
    "0190"  # width 400
    "01f4"  # height 500
    "00c5"  # x resolution 197 px/cm
    "00c5"  # y resolution 197 px/cm
    "01"  # one finger view
    "00"  # reserved
    "02"  # finger position 2
    "00"  # view number 0 | impression type 0
    "50"  # finger quality 80
    "02"  # two minutiae
    "4064"  # type 1 (ridge ending) << 14 | x 100
    "00c8"  # y 200
    "40"  # angle 64 * 360/256 = 90 degrees
    "46"  # quality 70
    "818f"  # type 2 (bifurcation) << 14 | x 399
    "0000"  # y 0
    "00"  # angle 0
    "00"  # quality 0 (not reported)
    "0000"  # extended data block length
)


def hand_built_template() -> FingerTemplate:
    return FingerTemplate.from_arrays(
        [[100, 200, math.pi / 2], [399, 0, 0.0]],
        width=400,
        height=500,
        kinds=[MinutiaKind.RIDGE_ENDING, MinutiaKind.BIFURCATION],
        quality=[70, 0],
        finger_position=2,
        finger_quality=80,
    )


def test_encoder_writes_the_hand_built_record_byte_for_byte() -> None:
    assert encode_template(hand_built_template()) == HAND_BUILT


def test_decoder_reads_the_hand_built_record() -> None:
    t = decode_template(HAND_BUILT)
    np.testing.assert_allclose(t.minutiae, [[100, 200, math.pi / 2], [399, 0, 0]], atol=1e-6)
    assert t.kinds.tolist() == [1, 2]
    assert t.quality.tolist() == [70, 0]
    assert (t.width, t.height, t.resolution_ppi) == (400, 500, 500)
    assert (t.finger_position, t.impression, t.finger_quality) == (2, 0, 80)


def test_decoder_skips_extended_data_and_ignores_reserved_bits() -> None:
    ext = b"\x00\x01\x00\x06\xab\xcd"  # one extended data area: type 1, length 6 incl. its own header
    body = bytearray(HAND_BUILT[:-2]) + struct.pack(">H", len(ext)) + ext
    body[8:12] = struct.pack(">I", len(body))
    body[24 + 4 + 2] |= 0xC0  # reserved bits above y of the first minutia
    t = decode_template(bytes(body))
    assert t.minutiae[0, 1] == 200


def with_length(data: bytes | bytearray, length: int) -> bytes:
    out = bytearray(data)
    out[8:12] = struct.pack(">I", length)
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HAND_BUILT[:10], "offset 10: truncated record header"),
        (b"FMX\0" + HAND_BUILT[4:], "offset 0: bad format identifier"),
        (HAND_BUILT[:4] + b" 30\0" + HAND_BUILT[8:], "offset 4: bad version"),
        (HAND_BUILT[:-1], "offset 8: record length says 42 bytes but only 41"),
        (HAND_BUILT + b"\0", "offset 42: 1 trailing bytes after the record length"),
        (with_length(HAND_BUILT + b"\0\0", 44), "offset 42: 2 trailing bytes after the last finger view"),
        (with_length(HAND_BUILT[:-2], 40), "offset 40: truncated extended data length"),
        (
            HAND_BUILT[:27] + b"\x03" + HAND_BUILT[28:],
            "offset 28: truncated minutiae of finger view 0 (3 declared)",
        ),
        (with_length(HAND_BUILT[:27] + b"\x00" + HAND_BUILT[40:], 30), "offset 27: finger view 0 holds zero"),
        (HAND_BUILT[:24] + b"\x0b" + HAND_BUILT[25:], "offset 24: finger position 11 outside 0-10"),
        (HAND_BUILT[:28] + b"\x41\x90" + HAND_BUILT[30:], "offset 28: minutia 0 of view 0 at (400, 200)"),
        (HAND_BUILT[:34] + b"\x81\x8f\x01\xf4" + HAND_BUILT[38:], "offset 34: minutia 1 of view 0"),
        (HAND_BUILT[:22] + b"\x00" + HAND_BUILT[23:], "offset 22: the record holds no finger views"),
        (HAND_BUILT[:22] + b"\x02" + HAND_BUILT[23:], "offset 42: truncated header of finger view 1"),
    ],
)
def test_decoder_rejects_malformed_records_naming_the_offset(data: bytes, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_record(data)


def test_decode_template_insists_on_one_view() -> None:
    two = encode_record(
        [
            hand_built_template(),
            FingerTemplate.from_arrays([[5, 5, 0]], width=400, height=500, finger_position=3),
        ]
    )
    assert len(decode_record(two)) == 2
    with pytest.raises(TemplateError, match="expected one finger view, the record holds 2"):
        decode_template(two)


@pytest.mark.parametrize(
    ("templates_", "message"),
    [
        ([], "at least one finger view"),
        ([FingerTemplate.from_arrays([[400, 0, 0]], width=400, height=500)], r"\(400, 0\) lies outside"),
        ([FingerTemplate.from_arrays([[-1, 0, 0]], width=400, height=500)], "lies outside"),
        ([FingerTemplate.from_arrays([[16384, 0, 0]], width=20000, height=500)], "beyond 14 bits"),
        ([FingerTemplate.from_arrays(np.zeros((0, 3)), width=400, height=500)], "0 minutiae"),
        ([FingerTemplate.from_arrays(np.ones((256, 3)), width=400, height=500)], "256 minutiae"),
        ([FingerTemplate.from_arrays([[1, 1, 0]], width=400, height=500, impression=16)], "4 bits"),
        ([FingerTemplate.from_arrays([[1, 1, 0]], width=70000, height=500)], "16 bits"),
        (
            [
                FingerTemplate.from_arrays([[1, 1, 0]], width=400, height=500, finger_position=2),
                FingerTemplate.from_arrays([[1, 1, 0]], width=400, height=500, finger_position=2),
            ],
            "view number 0 appears twice",
        ),
        (
            [
                FingerTemplate.from_arrays([[1, 1, 0]], width=400, height=500, finger_position=2),
                FingerTemplate.from_arrays([[1, 1, 0]], width=400, height=400, finger_position=3),
            ],
            "differs from the record's",
        ),
    ],
)
def test_encoder_rejects_what_the_format_cannot_hold(templates_: list[FingerTemplate], message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        encode_record(templates_)


# --- NIST .xyt ---------------------------------------------------------------------------------------


def test_xyt_uses_nbis_conventions() -> None:
    # A ridge ending at image (10, 20) pointing east (ISO 0°) in a 400x500 image:
    # NBIS writes y from the bottom (500 - 20) and theta pointing the other way (180).
    t = FingerTemplate.from_arrays(
        [[10, 20, 0.0], [0, 499, math.pi / 2]], width=400, height=500, quality=[55, 7]
    )
    assert write_xyt(t) == "10 480 180 55\n0 1 270 7\n"


@settings(max_examples=60, deadline=None)
@given(templates())
def test_xyt_round_trip_is_exact_for_positions(t: FingerTemplate) -> None:
    back = read_xyt(write_xyt(t), width=t.width, height=t.height, finger_position=t.finger_position)
    assert_same_except_angles(back, t, 0.5)
    assert (back.kinds == MinutiaKind.OTHER).all()


def test_read_xyt_from_a_path_and_three_column_lines(tmp_path) -> None:
    path = tmp_path / "a.xyt"
    path.write_text("10 480 180 55\n\n  3 3 90\n")
    t = read_xyt(path, width=400, height=500, finger_position=7)
    np.testing.assert_allclose(t.minutiae, [[10, 20, 0.0], [3, 497, 3 * math.pi / 2]], atol=1e-6)
    assert t.quality.tolist() == [55, 0]
    assert t.finger_position == 7


def test_read_xyt_defaults_to_a_512_pixel_image_and_reads_an_empty_file() -> None:
    t = read_xyt("0 512 0 0\n")
    assert (t.width, t.height) == (512, 512)
    assert t.minutiae[0, 1] == 0
    assert read_xyt("").count == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10 20 30 40\nfoo bar\n", "line 2: expected 'x y theta"),
        ("10 20 30 40\n\n1 2 x 4\n", "line 3: fields must be integers"),
        ("10 20 30 40 50\n", "line 1: expected"),
        ("1 2 3 4\n600 20 30 40\n", r"line 2: minutia \(600, 20\) lies outside a 512x512"),
        ("1 0 3 4\n", "line 1: minutia"),  # y_xyt 0 is image row 512, one past the last
        ("1 2 3 101\n", "line 1: quality 101"),
        ("minutiae.xyt", "pass a pathlib.Path"),
    ],
)
def test_read_xyt_rejects_malformed_lines_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        read_xyt(text)


def test_write_xyt_rejects_minutiae_outside_the_image() -> None:
    with pytest.raises(TemplateError, match="outside the 10x10 image"):
        write_xyt(FingerTemplate.from_arrays([[3, 10, 0]], width=10, height=10))
