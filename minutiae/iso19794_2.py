"""ISO/IEC 19794-2:2005 finger minutiae records ("FMR\\0", version " 20\\0"): read and write.

Layout (all integers big-endian), as the standard lays it out:

    record header, 24 bytes
      0  4  format identifier  b"FMR\\0"
      4  4  version            b" 20\\0"
      8  4  record length      total bytes of the record, header included
     12  2  capture equipment  4-bit certification flags + 12-bit equipment id (written 0)
     14  2  image width        pixels
     16  2  image height       pixels
     18  2  x resolution       pixels per centimetre
     20  2  y resolution       pixels per centimetre
     22  1  number of finger views
     23  1  reserved           (written 0, ignored on reading)
    per finger view
      finger view header, 4 bytes
        0  1  finger position  0-10 (ANSI/NIST FGP)
        1  1  view number (high 4 bits) | impression type (low 4 bits)
        2  1  finger quality   0-100
        3  1  number of minutiae
      minutiae, 6 bytes each
        0  2  type (high 2 bits) | x (low 14 bits)
        2  2  reserved (high 2 bits, ignored) | y (low 14 bits)
        4  1  angle            units of 360/256 degrees, counter-clockwise as viewed
        5  1  quality          0-100 (0: not reported)
      extended data block
        0  2  length of the extended data that follows (0: none); skipped on reading

Mapping to :class:`~minutiae.template.FingerTemplate`:

- coordinates are rounded to whole pixels on writing; integer coordinates round-trip exactly;
- angles are quantised to 256 steps: ``byte = round(theta / (2π/256)) mod 256``, so
  **the round-trip angle error is at most half a step, 360/512 = 0.703125 degrees**;
- ``FingerTemplate.impression`` is the view number (0-15: the n-th impression of
  that finger in the record); the impression *type* is a parameter of the writer
  (default 0, live-scan plain) and is not kept by the reader;
- resolution is stored in pixels per centimetre; the reader converts back to pixels
  per inch choosing the multiple of 10 ppi that encodes to the stored value when
  there is one, so 500 ppi (197 px/cm) and every multiple of 10 ppi round-trip exactly;
- minutia types: 0 other, 1 ridge ending, 2 bifurcation (:class:`MinutiaKind`); the
  value 3 is reserved and rejected.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from minutiae.template import FingerTemplate, MinutiaKind, TemplateError

FORMAT_ID = b"FMR\x00"
VERSION = b" 20\x00"
RECORD_HEADER_SIZE = 24
VIEW_HEADER_SIZE = 4
MINUTIA_SIZE = 6
EXTENDED_LENGTH_SIZE = 2

#: Largest angle error a write/read round trip can introduce, in degrees (half of 360/256).
ANGLE_ERROR_BOUND_DEGREES = 360.0 / 512.0

_ANGLE_STEP = 2.0 * math.pi / 256.0
_COORD_MAX = (1 << 14) - 1
_RECORD_HEADER = struct.Struct(">4s4sIHHHHHBB")
_VIEW_HEADER = struct.Struct(">BBBB")
# One minutia as a numpy record, so a view's minutiae are packed and unpacked without a Python loop.
_MINUTIA_DTYPE = np.dtype([("type_x", ">u2"), ("res_y", ">u2"), ("angle", "u1"), ("quality", "u1")])
# A plain int: comparing a numpy scalar with the enum member takes a slow path.
_LAST_KIND = int(MinutiaKind.BIFURCATION)


def _ppi_to_ppcm(ppi: int) -> int:
    return int(ppi / 2.54 + 0.5)


def _ppcm_to_ppi(ppcm: int) -> int:
    """Inverse of :func:`_ppi_to_ppcm`, preferring round figures so that 500 ppi comes back as 500."""
    lo = math.floor((ppcm - 0.5) * 2.54) - 1
    hi = math.ceil((ppcm + 0.5) * 2.54) + 1
    candidates = [p for p in range(max(lo, 1), hi + 1) if _ppi_to_ppcm(p) == ppcm]
    round_ones = [p for p in candidates if p % 10 == 0]
    if round_ones:
        return round_ones[0]
    return round(ppcm * 2.54)


def encode_record(templates: Sequence[FingerTemplate], *, impression_type: int = 0) -> bytes:
    """Encodes one or more finger views into one ISO/IEC 19794-2:2005 record.

    All templates must share the image size and resolution (the record header holds
    one of each). Each ``(finger_position, impression)`` pair must be unique, since the
    standard identifies a view by finger position and view number.
    Raises :class:`TemplateError` for anything the format cannot hold.
    """
    if not templates:
        raise TemplateError("a record needs at least one finger view")
    if len(templates) > 255:
        raise TemplateError(f"{len(templates)} finger views do not fit the one-byte count (255 at most)")
    if not 0 <= impression_type <= 15:
        raise TemplateError(f"impression type {impression_type} does not fit 4 bits")
    first = templates[0]
    width, height, ppi = first.width, first.height, first.resolution_ppi
    if width > 0xFFFF or height > 0xFFFF:
        raise TemplateError(f"image size {width}x{height} does not fit 16 bits")
    ppcm = _ppi_to_ppcm(ppi)
    if not 1 <= ppcm <= 0xFFFF:
        raise TemplateError(f"resolution {ppi} ppi cannot be stored in pixels per centimetre")

    views: list[bytes] = []
    seen: set[tuple[int, int]] = set()
    for index, t in enumerate(templates):
        where = f"view {index} (finger {t.finger_position})"
        if (t.width, t.height, t.resolution_ppi) != (width, height, ppi):
            raise TemplateError(
                f"{where}: image {t.width}x{t.height} at {t.resolution_ppi} ppi differs from the record's "
                f"{width}x{height} at {ppi} ppi"
            )
        key = (t.finger_position, t.impression)
        if key in seen:
            raise TemplateError(f"{where}: view number {t.impression} appears twice for this finger")
        seen.add(key)
        views.append(_encode_view(t, impression_type, where))

    body = b"".join(views)
    length = RECORD_HEADER_SIZE + len(body)
    header = _RECORD_HEADER.pack(FORMAT_ID, VERSION, length, 0, width, height, ppcm, ppcm, len(templates), 0)
    return header + body


def _encode_view(t: FingerTemplate, impression_type: int, where: str) -> bytes:
    if not 1 <= t.count <= 255:
        raise TemplateError(f"{where}: {t.count} minutiae; a view holds 1 to 255")
    if not 0 <= t.impression <= 15:
        raise TemplateError(f"{where}: impression (view number) {t.impression} does not fit 4 bits")
    if not 0 <= t.finger_quality <= 100:
        raise TemplateError(f"{where}: finger quality {t.finger_quality} outside 0-100")
    # Checks with as few array passes as possible: the evaluation set encodes millions of views.
    if not np.isfinite(t.minutiae).all():
        raise TemplateError(f"{where}: minutiae hold NaN or infinity")
    xy = np.rint(t.minutiae[:, :2]).astype(np.int64)
    x, y = xy[:, 0], xy[:, 1]
    # Seen as unsigned, a negative coordinate is huge: one comparison per axis checks both ends.
    limits = np.array([min(t.width, _COORD_MAX + 1), min(t.height, _COORD_MAX + 1)], np.uint64)
    bad = (xy.view(np.uint64) >= limits).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TemplateError(
            f"{where}: minutia {i} at ({x[i]}, {y[i]}) lies outside the {t.width}x{t.height} image "
            f"or beyond 14 bits"
        )
    if t.kinds.max() > _LAST_KIND:
        i = int(np.flatnonzero(t.kinds > _LAST_KIND)[0])
        raise TemplateError(f"{where}: minutia {i} has type {t.kinds[i]}, which 2 bits cannot hold validly")
    if t.quality.max() > 100:
        i = int(np.flatnonzero(t.quality > 100)[0])
        raise TemplateError(f"{where}: minutia {i} has quality {t.quality[i]} outside 0-100")

    theta = np.mod(t.minutiae[:, 2].astype(np.float64), 2.0 * math.pi)
    packed = np.empty(t.count, _MINUTIA_DTYPE)
    packed["type_x"] = (t.kinds.astype(np.uint16) << 14) | x.astype(np.uint16)
    packed["res_y"] = y.astype(np.uint16)
    packed["angle"] = (np.rint(theta / _ANGLE_STEP).astype(np.int64) % 256).astype(np.uint8)
    packed["quality"] = t.quality
    header = _VIEW_HEADER.pack(
        t.finger_position, (t.impression << 4) | impression_type, t.finger_quality, t.count
    )
    return header + packed.tobytes() + b"\x00\x00"


def encode_template(template: FingerTemplate, *, impression_type: int = 0) -> bytes:
    """Encodes a single finger as a one-view record (the form a booking's ten-print carries)."""
    return encode_record([template], impression_type=impression_type)


def decode_record(data: bytes) -> list[FingerTemplate]:
    """Decodes every finger view of a record, in record order.

    Raises :class:`TemplateError` naming the byte offset and the fault for bad magic,
    bad version, a length that disagrees with the data (truncation or trailing bytes),
    a view with no minutiae, a finger position outside 0-10, coordinates outside the
    image, reserved minutia type 3, or qualities above 100.
    """
    data = bytes(data)
    if len(data) < RECORD_HEADER_SIZE:
        raise TemplateError(
            f"offset {len(data)}: truncated record header ({len(data)} of {RECORD_HEADER_SIZE} bytes)"
        )
    magic, version, length, _equipment, width, height, xres, yres, n_views, _reserved = (
        _RECORD_HEADER.unpack_from(data, 0)
    )
    if magic != FORMAT_ID:
        raise TemplateError(f"offset 0: bad format identifier {magic!r}, expected {FORMAT_ID!r}")
    if version != VERSION:
        raise TemplateError(f"offset 4: bad version {version!r}, expected {VERSION!r} (ISO/IEC 19794-2:2005)")
    if length > len(data):
        raise TemplateError(f"offset 8: record length says {length} bytes but only {len(data)} are present")
    if length < len(data):
        raise TemplateError(f"offset {length}: {len(data) - length} trailing bytes after the record length")
    if width == 0 or height == 0:
        raise TemplateError(f"offset 14: image size {width}x{height} must be positive")
    if xres == 0 or xres != yres:
        raise TemplateError(f"offset 18: resolution {xres}x{yres} px/cm must be positive and square")
    if n_views == 0:
        raise TemplateError("offset 22: the record holds no finger views")
    ppi = _ppcm_to_ppi(xres)

    templates: list[FingerTemplate] = []
    offset = RECORD_HEADER_SIZE
    for view in range(n_views):
        template, offset = _decode_view(data, offset, view, width, height, ppi)
        templates.append(template)
    if offset != len(data):
        raise TemplateError(
            f"offset {offset}: {len(data) - offset} trailing bytes after the last finger view"
        )
    return templates


def _need(data: bytes, offset: int, size: int, what: str) -> None:
    if offset + size > len(data):
        raise TemplateError(
            f"offset {offset}: truncated {what} (needs {size} bytes, {len(data) - offset} left)"
        )


def _decode_view(
    data: bytes, offset: int, view: int, width: int, height: int, ppi: int
) -> tuple[FingerTemplate, int]:
    _need(data, offset, VIEW_HEADER_SIZE, f"header of finger view {view}")
    position, view_byte, finger_quality, count = _VIEW_HEADER.unpack_from(data, offset)
    if position > 10:
        raise TemplateError(f"offset {offset}: finger position {position} outside 0-10 (view {view})")
    if finger_quality > 100:
        raise TemplateError(f"offset {offset + 2}: finger quality {finger_quality} outside 0-100")
    if count == 0:
        raise TemplateError(f"offset {offset + 3}: finger view {view} holds zero minutiae")
    offset += VIEW_HEADER_SIZE

    _need(data, offset, count * MINUTIA_SIZE, f"minutiae of finger view {view} ({count} declared)")
    raw = np.frombuffer(data, _MINUTIA_DTYPE, count=count, offset=offset)
    kinds = (raw["type_x"] >> 14).astype(np.uint8)
    x = (raw["type_x"] & _COORD_MAX).astype(np.int64)
    y = (raw["res_y"] & _COORD_MAX).astype(np.int64)
    quality = raw["quality"].astype(np.uint8)
    checks = (
        ((x >= width) | (y >= height), "lies outside the image"),
        (kinds > MinutiaKind.BIFURCATION, "has reserved type 3"),
        (quality > 100, "has quality above 100"),
    )
    for bad, what in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TemplateError(
                f"offset {offset + i * MINUTIA_SIZE}: minutia {i} of view {view} at ({x[i]}, {y[i]}) {what} "
                f"({width}x{height})"
            )
    theta = raw["angle"].astype(np.float64) * _ANGLE_STEP
    offset += count * MINUTIA_SIZE

    _need(data, offset, EXTENDED_LENGTH_SIZE, f"extended data length of finger view {view}")
    (extended,) = struct.unpack_from(">H", data, offset)
    offset += EXTENDED_LENGTH_SIZE
    # Extended data (ridge counts, core/delta) is skipped: the template model has no place for it yet.
    _need(data, offset, extended, f"extended data of finger view {view}")
    offset += extended

    template = FingerTemplate(
        minutiae=np.stack([x, y, theta], axis=1).astype(np.float32),
        kinds=kinds,
        quality=quality,
        width=width,
        height=height,
        resolution_ppi=ppi,
        finger_position=position,
        impression=view_byte >> 4,
        finger_quality=finger_quality,
    )
    return template, offset


def decode_template(data: bytes) -> FingerTemplate:
    """Decodes a record that must hold exactly one finger view."""
    templates = decode_record(data)
    if len(templates) != 1:
        raise TemplateError(f"offset 22: expected one finger view, the record holds {len(templates)}")
    return templates[0]
