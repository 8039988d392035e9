"""ANSI/NIST-ITL 1-2011 transactions (Type-1, 2, 4, 9, 14): read and write, bounded and checked.

`nistitl` does the tagged-field syntax both ways; what it leaves to us is done here: the
binary Type-4 header (packed with :mod:`struct`), the Type-9 minutiae layout, the meaning
of every field, and the bounds. Before any byte reaches `nistitl`, :func:`_frame` walks the
record lengths and tags itself, so every malformed input is a :class:`TransactionError`
naming the record and field, never another exception, a hang (a zero length would loop
`nistitl`'s parser forever) or an allocation past the limits below.

Records are numbered by their place in the transaction: the Type-1 header is record 1.

Fields written and read (an EBTS criminal ten-print submission, trimmed to what the
federation uses):

- Type-1: 1.002 VER ``0500``, 1.003 CNT, 1.004 TOT (``CAR``), 1.005 DAT (CCYYMMDD),
  1.007 DAI, 1.008 ORI, 1.009 TCN, 1.011 NSR and 1.012 NTR (``19.69`` px/mm, 500 ppi).
- Type-2 (IDC 0): 2.045 DOA date of arrest (CCYYMMDD); 2.047 ASL arrest segment literal, one
  subfield per charge with the EBTS items DOO (date of offense) and AOL (offense literal);
  **2.901 NCI, fedprint's own field** (EBTS has none for it): one subfield per charge, in
  ASL's order, with the four-digit NCIC offense code and the number of counts.
- Type-4 (binary, 18-byte header): IDC, IMP, FGP (six bytes, first used, rest 255), ISR
  (0: 19.69 px/mm; 1: Type-1's NSR), HLL, VLL, CGA (1: WSQ; nothing else is accepted), data.
- Type-9 (the ANSI/NIST legacy "standard" layout): 9.003 IMP, 9.004 FMT ``S``, 9.005 OFR,
  9.006 FGP, 9.007 FPC, 9.010 MIN, 9.011 RDG ``0``, 9.012 MRC (per minutia: index,
  ``XXXXYYYYTTT`` in 0.01 mm from the image's lower-left corner and whole degrees
  counter-clockwise, quality 2-63 best first or 1 unknown, type A/B/D). Its IDC names the
  image record of the same finger, whose size gives the y flip.
- Type-14: 14.003 IMP, 14.004 SRC, 14.005 FCD, 14.006 HLL, 14.007 VLL, 14.008 SLC (1: ppi,
  2: px/cm), 14.009 THPS, 14.010 TVPS, 14.011 CGA (``WSQ20`` or ``PNG``), 14.012 BPX (8),
  14.013 FGP, 14.999 DATA.

Finger positions are EBTS FGP codes: 1-10 rolled, 11/12 right/left plain thumb, 13/14
right/left four-finger slap. Resolution must be 500 ppi within :data:`PPI_TOLERANCE`.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import nistitl
import numpy as np
import numpy.typing as npt
import wsq  # noqa: F401  (registers the WSQ codec with Pillow)
from PIL import Image

from minutiae.template import FingerTemplate, MinutiaKind, TemplateError

#: Largest transaction read or written: fourteen 2048x2048 PNGs fit with room to spare.
MAX_TRANSACTION_BYTES = 16 * 1024 * 1024
#: Most records after the Type-1 header (14 images, 14 minutiae records, Type-2 and margin).
MAX_RECORDS = 64
#: Largest image side and pixel count: a four-finger slap at 500 ppi is about 1600x1500.
MAX_IMAGE_SIDE = 2048
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
#: Most charges in one Type-2 record, and most minutiae in one Type-9 record (as ISO 19794-2).
MAX_CHARGES = 40
MAX_MINUTIAE = 255
#: Longest value of one text field (an AOL literal is at most 300 characters in EBTS).
MAX_TEXT = 300
#: Longest text field, and most separators (GS, RS, US) in one record's text: counted before any
#: split, because a record made of separators would otherwise become millions of objects (ours
#: and nistitl's). 255 minutiae of four items need about 1,300.
MAX_FIELD_BYTES = 16 * 1024
MAX_SEPARATORS = 4096
NOMINAL_PPI = 500
#: Accepted resolution: 500 ppi ± 1 % (the ANSI/NIST 19.69 ± 0.2 px/mm band, rounded).
PPI_TOLERANCE = 5
#: Finger positions an image may have (EBTS FGP): 1-10 rolled, 11-14 plain thumbs and slaps.
IMAGE_POSITIONS = range(1, 15)
VERSION = "0500"
#: Longest a WSQ decode may take (500x500 takes about 7 ms) before its worker is killed.
WSQ_DECODE_TIMEOUT_S = 10.0

Compression = Literal["WSQ", "PNG"]

_FS, _GS, _RS, _US = b"\x1c", b"\x1d", b"\x1e", b"\x1f"
_TYPE4_HEADER = struct.Struct(">IBB6sBHHB")
_TYPE4_CGA_WSQ = 1
_TAG = re.compile(rb"(\d{1,2})\.(\d{3}):")
_DATE = re.compile(r"\d{8}")
_NCIC = re.compile(r"\d{4}")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TYPE14_CGA = {"WSQ20": "WSQ", "PNG": "PNG"}
_ALIAS = {
    1: {2: "VER", 3: "CNT", 4: "TOT", 5: "DAT", 7: "DAI", 8: "ORI", 9: "TCN", 11: "NSR", 12: "NTR"},
    2: {2: "IDC", 45: "DOA", 47: "ASL", 901: "NCI"},
    4: {1: "LEN", 2: "IDC", 3: "IMP", 4: "FGP", 5: "ISR", 6: "HLL", 7: "VLL", 8: "CGA", 9: "DATA"},
    9: {2: "IDC", 3: "IMP", 4: "FMT", 6: "FGP", 10: "MIN", 12: "MRC"},
    14: {2: "IDC", 3: "IMP", 6: "HLL", 7: "VLL", 8: "SLC", 9: "THPS", 10: "TVPS", 11: "CGA", 12: "BPX"}
    | {13: "FGP", 999: "DATA"},
}


class TransactionError(ValueError):
    """A transaction (or an image in it) is malformed, or cannot be written.

    ``record`` names the record (``"Type-14 record 3"``) and ``field`` the field
    (``"14.013 FGP"``) where known; the service turns both into a field violation.
    """

    def __init__(self, message: str, *, record: str | None = None, field: str | None = None) -> None:
        self.message = message
        self.record = record
        self.field = field
        where = ", ".join(p for p in (record, f"field {field}" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


def _where(record_type: int, index: int) -> str:
    return f"Type-{record_type} record {index}"


def _field_name(record_type: int, tag: int) -> str:
    alias = _ALIAS.get(record_type, {}).get(tag, "")
    return f"{record_type}.{tag:03d} {alias}".rstrip()


@dataclass(frozen=True)
class Charge:
    """One charge: a four-digit NCIC offense code, the agency's literal, and its counts."""

    code: str
    literal: str
    counts: int = 1


@dataclass(frozen=True)
class FingerImage:
    """One fingerprint image of a transaction, still compressed as it travelled."""

    position: int
    data: bytes
    compression: Compression
    width: int
    height: int
    ppi: int = NOMINAL_PPI
    #: ANSI/NIST impression type: 0 live-scan plain, 1 live-scan rolled.
    impression: int = 1

    def pixels(self) -> npt.NDArray[np.uint8]:
        """The decoded image ``[height, width]``; :class:`TransactionError` if it does not decode."""
        return decode_image(self.data, self.compression, width=self.width, height=self.height)


@dataclass(frozen=True)
class Transaction:
    """What the federation takes from an ANSI/NIST-ITL transaction.

    ``templates`` are Type-9 minutiae, each linked to the image of the same finger position.
    """

    tcn: str
    ori: str
    date: dt.date
    charges: tuple[Charge, ...]
    images: tuple[FingerImage, ...]
    templates: tuple[FingerTemplate, ...] = ()
    tot: str = "CAR"
    dai: str = "XXFEDPRNT"
    version: str = VERSION
    #: ``(record type, IDC)`` of every record after Type-1, in order (Type-1's CNT); set by the reader.
    records: tuple[tuple[int, int], ...] = ()


# --- images ---------------------------------------------------------------------------------


def check_ppi(ppi: float) -> int:
    """The resolution as whole ppi if it is 500 ppi within :data:`PPI_TOLERANCE`, else an error."""
    if not math.isfinite(ppi) or abs(ppi - NOMINAL_PPI) > PPI_TOLERANCE:
        raise TransactionError(f"resolution {ppi:g} ppi, expected {NOMINAL_PPI} ± {PPI_TOLERANCE}")
    return round(ppi)


def _check_size(width: int, height: int) -> None:
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise TransactionError(f"image size {width}x{height} outside 1-{MAX_IMAGE_SIDE} per side")
    if width * height > MAX_IMAGE_PIXELS:
        raise TransactionError(f"image of {width * height} pixels, at most {MAX_IMAGE_PIXELS}")


def image_size(data: bytes, compression: Compression) -> tuple[int, int]:
    """``(width, height)`` from the image's own header, without decoding it (cheap, bounded)."""
    if compression == "PNG":
        if len(data) < 29 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
            raise TransactionError("not a PNG (no signature and IHDR chunk)")
        width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
        if (depth, colour) != (8, 0):
            raise TransactionError(f"PNG of bit depth {depth}, colour type {colour}; 8-bit grey needed")
        return width, height
    # WSQ: SOI, then tables and comments (each with a two-byte length), then the frame header.
    if data[:2] != b"\xff\xa0":
        raise TransactionError("not a WSQ image (no SOI marker FFA0)")
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos : pos + 2]
        if marker == b"\xff\xa2":
            if pos + 10 > len(data):
                break
            height, width = struct.unpack_from(">HH", data, pos + 6)
            return width, height
        if marker not in (b"\xff\xa4", b"\xff\xa5", b"\xff\xa6", b"\xff\xa8"):
            raise TransactionError(f"WSQ marker {marker.hex().upper()} at byte {pos} before the frame")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + max(length, 2)
    raise TransactionError("WSQ image ends before its frame header (FFA2)")


def decode_image(
    data: bytes, compression: Compression, *, width: int | None = None, height: int | None = None
) -> npt.NDArray[np.uint8]:
    """Decodes a WSQ or PNG (8-bit grey) image to ``[height, width]`` uint8.

    The size in the image's header is bounded before decoding, and must equal ``width`` and
    ``height`` when given (the record's HLL and VLL). Anything that does not decode is a
    :class:`TransactionError`.
    """
    w, h = image_size(data, compression)
    _check_size(w, h)
    if (width is not None and w != width) or (height is not None and h != height):
        raise TransactionError(f"{compression} image is {w}x{h}, the record says {width}x{height}")
    if compression == "WSQ":
        size, flat = _WSQ_WORKER.decode(data, w * h)
        if size != (w, h) or flat.size != w * h:
            raise TransactionError(f"WSQ image decodes to {size}, its header says {w}x{h}")
        return flat.reshape(h, w).copy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                if image.size != (w, h) or image.mode != "L":
                    raise TransactionError(f"PNG image decodes as {image.mode} {image.size}")
                image.load()
                pixels = np.asarray(image, dtype=np.uint8).copy()
    except TransactionError:
        raise
    except Exception as error:  # Pillow raises many kinds; all mean the same here
        raise TransactionError(f"PNG image does not decode: {error}") from error
    if pixels.shape != (h, w):
        raise TransactionError(f"{compression} image decodes to {pixels.shape}, expected {(h, w)}")
    return pixels


def _wsq_worker_main() -> None:
    """The WSQ decoding process (``python -c``): frames of ``>I`` length + WSQ bytes on stdin,
    answers ``>BII`` (0 ok / 1 error, width, height) + ``>I`` length + pixels or message on stdout."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = source.read(4)
        if len(head) < 4:
            return
        data = source.read(struct.unpack(">I", head)[0])
        try:
            with Image.open(io.BytesIO(data), formats=["WSQ"]) as image:
                image.load()
                (width, height), payload, status = image.size, image.tobytes(), 0
        except Exception as error:  # any codec failure is reported, the worker lives on
            width = height = 0
            payload, status = str(error).encode("utf-8", "replace")[:500], 1
        sink.write(struct.pack(">BIII", status, width, height, len(payload)) + payload)
        sink.flush()


class _WsqWorker:
    """NBIS's WSQ decoder (C) **segfaults** on some corrupt entropy-coded data (the fuzz test
    found one changed byte enough), so untrusted WSQ is decoded in a child process: a crash or
    a hang there is a :class:`TransactionError` here, and the next call starts a fresh child.
    One child, decodes serialised, started on first use with ``python -c`` (no fork of a
    process that holds gRPC threads, no re-import of the caller's main module)."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._command = list(
            command or [sys.executable, "-c", "from minutiae.an2 import _wsq_worker_main; _wsq_worker_main()"]
        )

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for pipe in (self._process.stdin, self._process.stdout):
                if pipe is not None:
                    pipe.close()
        self._process = None

    def _read(self, fd: int, size: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        while size > 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def decode(self, data: bytes, pixels: int) -> tuple[tuple[int, int], npt.NDArray[np.uint8]]:
        """Decodes in the child; ``pixels`` bounds what the answer may hold."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._stop()
                self._process = subprocess.Popen(
                    self._command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            process = self._process
            assert process.stdin is not None and process.stdout is not None
            deadline = time.monotonic() + WSQ_DECODE_TIMEOUT_S
            try:
                process.stdin.write(struct.pack(">I", len(data)) + data)
                process.stdin.flush()
                fd = process.stdout.fileno()
                status, width, height, length = struct.unpack(">BIII", self._read(fd, 13, deadline))
                if length > max(pixels, 500):
                    raise EOFError
                payload = self._read(fd, length, deadline)
            except TimeoutError:
                self._stop()
                raise TransactionError(f"WSQ image took over {WSQ_DECODE_TIMEOUT_S:g} s to decode") from None
            except (EOFError, OSError):
                self._stop()
                raise TransactionError("WSQ image crashed the decoder") from None
        if status != 0:
            raise TransactionError(f"WSQ image does not decode: {payload.decode('utf-8', 'replace')}")
        return (width, height), np.frombuffer(payload, np.uint8)


_WSQ_WORKER = _WsqWorker()


def encode_image(pixels: npt.ArrayLike, compression: Compression) -> bytes:
    """Encodes ``[height, width]`` uint8 grey pixels as WSQ (NBIS, fixed bitrate) or PNG."""
    array = np.asarray(pixels)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise TransactionError(f"image must be [height, width] uint8, got {array.dtype} {list(array.shape)}")
    _check_size(array.shape[1], array.shape[0])
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, "WSQ" if compression == "WSQ" else "PNG")
    return buffer.getvalue()


def placeholder_image(
    position: int, *, width: int = 400, height: int = 400, seed: int = 0
) -> npt.NDArray[np.uint8]:
    """A deterministic **placeholder**, not a fingerprint: concentric sine rings about an
    off-centre point (about 9 px period, as ridges at 500 ppi), so that the image path can be
    exercised until the ridge renderer exists. Nothing here resembles a real finger."""
    rng = np.random.default_rng([seed, position])
    cy, cx = rng.uniform(0.35, 0.65, 2) * (height, width)
    y, x = np.mgrid[0:height, 0:width]
    r = np.hypot(y - cy, x - cx)
    pattern = 128 + 100 * np.sin(2 * math.pi * r / 9.0 + rng.uniform(0, 2 * math.pi))
    image: npt.NDArray[np.uint8] = np.clip(pattern, 0, 255).astype(np.uint8)
    return image


# --- framing: the pre-pass that makes nistitl's input safe ------------------------------------


@dataclass
class _Record:
    type: int
    index: int
    start: int
    end: int
    fields: dict[int, bytes] = field(default_factory=dict)


def _digits(value: bytes, record: str, fname: str, *, most: int = 9) -> int:
    if not value.isdigit() or len(value) > most:
        raise TransactionError(
            f"{value[:20]!r} is not a number of 1-{most} digits", record=record, field=fname
        )
    return int(value)


def _tagged(data: bytes, start: int, rtype: int, index: int) -> _Record:
    """One tagged-field record at ``start``: its length, its fields, its terminator."""
    where = _where(rtype, index)
    prefix = f"{rtype}.001:".encode()
    if not data.startswith(prefix, start):
        raise TransactionError(
            f"record does not start with {prefix.decode()}", record=where, field=f"{rtype}.001 LEN"
        )
    gs = data.find(_GS, start, start + len(prefix) + 10)
    if gs < 0:
        raise TransactionError("length not followed by a separator", record=where, field=f"{rtype}.001 LEN")
    length = _digits(data[start + len(prefix) : gs], where, f"{rtype}.001 LEN")
    end = start + length
    if length < gs - start + 2 or end > len(data):
        raise TransactionError(
            f"length {length} does not fit the {len(data) - start} bytes left",
            record=where,
            field=f"{rtype}.001 LEN",
        )
    body = data[start : end - 1]
    binary: bytes | None = None
    if rtype == 14:
        # nistitl finds the image at the first "999:" in the record: it must be the DATA tag.
        at = body.find(b"999:")
        if at < 0 or body[at - 4 : at] != b"\x1d14.":
            raise TransactionError(
                "no image data field, or '999:' inside a text field", record=where, field="14.999 DATA"
            )
        binary, body = body[at + 4 :], body[: at - 4]
        if data[end - 1 : end] != _FS:
            raise TransactionError("record not terminated by FS", record=where, field="14.999 DATA")
    elif data[end - 1 : end] != _FS:
        raise TransactionError(
            "record not terminated by FS at its length", record=where, field=f"{rtype}.001 LEN"
        )
    if _FS in body:
        raise TransactionError("separator FS inside the record", record=where)
    separators = body.count(_GS) + body.count(_RS) + body.count(_US)
    if separators > MAX_SEPARATORS:
        raise TransactionError(f"{separators} separators, at most {MAX_SEPARATORS}", record=where)
    record = _Record(rtype, index, start, end)
    for n, item in enumerate(body.split(_GS)):
        match = _TAG.match(item)
        if match is None or int(match[1]) != rtype:
            raise TransactionError(f"field {n + 1} has no tag '{rtype}.NNN:'", record=where)
        tag = int(match[2])
        if tag in record.fields or (n == 0) != (tag == 1) or (n == 1 and rtype != 1 and tag != 2):
            raise TransactionError(
                "tag repeated or out of order", record=where, field=_field_name(rtype, tag)
            )
        value = item[match.end() :]
        if tag == 2 and rtype != 1:
            _digits(value, where, _field_name(rtype, 2), most=2)
        record.fields[tag] = value
    if binary is not None:
        record.fields[999] = binary
    return record


def _frame(data: bytes) -> list[_Record]:
    if len(data) > MAX_TRANSACTION_BYTES:
        raise TransactionError(f"{len(data)} bytes, at most {MAX_TRANSACTION_BYTES}", record="transaction")
    header = _tagged(data, 0, 1, 1)
    cnt = header.fields.get(3, b"")
    subfields = cnt.split(_RS)
    if len(subfields) - 1 > MAX_RECORDS:
        raise TransactionError(
            f"{len(subfields) - 1} records, at most {MAX_RECORDS}",
            record="Type-1 record 1",
            field="1.003 CNT",
        )
    listed: list[tuple[int, int]] = []
    for sub in subfields:
        items = sub.split(_US)
        if len(items) != 2:
            raise TransactionError(
                "each subfield needs a record type and an IDC", record="Type-1 record 1", field="1.003 CNT"
            )
        listed.append(
            (
                _digits(items[0], "Type-1 record 1", "1.003 CNT", most=2),
                _digits(items[1], "Type-1 record 1", "1.003 CNT", most=2),
            )
        )
    if listed[0][0] != 1 or listed[0][1] != len(listed) - 1:
        raise TransactionError(
            f"first subfield {listed[0]} should be (1, {len(listed) - 1})",
            record="Type-1 record 1",
            field="1.003 CNT",
        )
    records = [header]
    offset = header.end
    for index, (rtype, idc) in enumerate(listed[1:], start=2):
        where = _where(rtype, index)
        if offset >= len(data):
            raise TransactionError("missing: the transaction ends before it", record=where)
        if rtype == 4:
            if offset + _TYPE4_HEADER.size > len(data):
                raise TransactionError("truncated binary header", record=where, field="4.001 LEN")
            (length,) = struct.unpack_from(">I", data, offset)
            if not _TYPE4_HEADER.size < length <= len(data) - offset:
                raise TransactionError(f"length {length} does not fit", record=where, field="4.001 LEN")
            record = _Record(4, index, offset, offset + length)
            if data[offset + 4] != idc:
                raise TransactionError(
                    f"IDC {data[offset + 4]} but CNT says {idc}", record=where, field="4.002 IDC"
                )
        elif rtype in (2, 9, 14):
            record = _tagged(data, offset, rtype, index)
            if int(record.fields.get(2, b"-1") or b"-1") != idc:
                raise TransactionError(
                    f"IDC differs from CNT's {idc}", record=where, field=_field_name(rtype, 2)
                )
        else:
            raise TransactionError(
                "record type not accepted (only 1, 2, 4, 9, 14)", record=where, field="1.003 CNT"
            )
        records.append(record)
        offset = record.end
    if offset != len(data):
        raise TransactionError(f"{len(data) - offset} bytes after the last record", record="transaction")
    return records


# --- reading --------------------------------------------------------------------------------


def read_transaction(data: bytes, *, verify_images: bool = True) -> Transaction:
    """Reads a transaction; raises :class:`TransactionError` (only) naming record and field.

    With ``verify_images`` every image is decoded once to prove it decodes at its declared
    size (about 7 ms per 500x500 WSQ); without, only its header is checked.
    """
    data = bytes(data)
    records = _frame(data)
    message = nistitl.Message()
    try:
        message.parse(data)
    except Exception as error:  # framing passed, so this is a gap in it: still one error type
        raise TransactionError(f"nistitl refused the transaction: {error}", record="transaction") from error
    if len(message) != len(records):
        raise TransactionError("nistitl found another number of records", record="transaction")

    t1 = records[0].fields
    text = _TextReader(1, 1, t1)
    tcn, ori, dai, tot = text.ident(9), text.ident(8), text.ident(7), text.ident(4)
    date = text.date(5)
    version = text.get(2)
    nsr = text.get(11) if 11 in t1 else "19.69"
    charges: list[Charge] = []
    images: dict[int, tuple[FingerImage, int]] = {}
    minutiae: list[tuple[_Record, Any]] = []
    for record, parsed in zip(records[1:], list(message)[1:], strict=True):
        if record.type == 2:
            if charges:
                raise TransactionError("a second Type-2 record", record=_where(2, record.index))
            charges = _read_charges(record)
        elif record.type in (4, 14):
            idc, image = _read_image(record, parsed, nsr)
            if idc in images:
                raise TransactionError(
                    f"IDC {idc} used twice",
                    record=_where(record.type, record.index),
                    field=_field_name(record.type, 2),
                )
            if any(other.position == image.position for other, _ in images.values()):
                raise TransactionError(
                    f"finger position {image.position} given twice",
                    record=_where(record.type, record.index),
                    field=_field_name(record.type, 4 if record.type == 4 else 13),
                )
            if verify_images:
                _in(record, 999 if record.type == 14 else 9, image.pixels)
            images[idc] = (image, record.index)
        else:
            minutiae.append((record, parsed))
    if not charges:
        raise TransactionError("no Type-2 record with the charges", record="transaction")
    templates = tuple(
        _read_minutiae(record, {idc: im for idc, (im, _) in images.items()}) for record, _ in minutiae
    )
    return Transaction(
        tcn=tcn,
        ori=ori,
        date=date,
        charges=tuple(charges),
        images=tuple(im for im, _ in images.values()),
        templates=templates,
        records=tuple((r.type, _record_idc(r, data)) for r in records[1:]),
        tot=tot,
        dai=dai,
        version=version,
    )


def _record_idc(record: _Record, data: bytes) -> int:
    return data[record.start + 4] if record.type == 4 else int(record.fields[2])


def _in(record: _Record, tag: int, call: Any) -> Any:
    """Runs ``call``, giving a context-free :class:`TransactionError` this record and field."""
    try:
        return call()
    except TransactionError as error:
        raise TransactionError(
            error.message, record=_where(record.type, record.index), field=_field_name(record.type, tag)
        ) from error


class _TextReader:
    """Typed access to the text fields of one record, every fault named."""

    def __init__(self, rtype: int, index: int, fields: dict[int, bytes]) -> None:
        self.rtype, self.index, self.fields = rtype, index, fields

    def fail(self, tag: int, message: str) -> TransactionError:
        return TransactionError(
            message, record=_where(self.rtype, self.index), field=_field_name(self.rtype, tag)
        )

    def get(self, tag: int) -> str:
        if tag not in self.fields:
            raise self.fail(tag, "missing")
        value = self.fields[tag]
        if len(value) > MAX_FIELD_BYTES or any(
            c < 0x20 or c > 0x7E for c in value.translate(None, _RS + _US)
        ):
            raise self.fail(tag, "not printable ASCII or too long")
        return value.decode("ascii")

    def ident(self, tag: int) -> str:
        value = self.get(tag)
        if not 1 <= len(value) <= 54 or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", value):
            raise self.fail(tag, f"{value[:60]!r} is not 1-54 of A-Z a-z 0-9 _.:-")
        return value

    def number(self, tag: int, low: int, high: int) -> int:
        value = self.get(tag)
        if not value.isdigit() or len(value) > 6 or not low <= int(value) <= high:
            raise self.fail(tag, f"{value[:20]!r} is not a number in {low}-{high}")
        return int(value)

    def date(self, tag: int) -> dt.date:
        value = self.get(tag)
        try:
            if not _DATE.fullmatch(value):
                raise ValueError(value)
            return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
        except ValueError:
            raise self.fail(tag, f"{value[:20]!r} is not a date CCYYMMDD") from None


def _read_charges(record: _Record) -> list[Charge]:
    text = _TextReader(2, record.index, record.fields)
    if 45 in record.fields:
        text.date(45)
    asl = [s.split("\x1f") for s in text.get(47).split("\x1e")]
    nci = [s.split("\x1f") for s in text.get(901).split("\x1e")]
    if len(asl) > MAX_CHARGES:
        raise text.fail(47, f"{len(asl)} charges, at most {MAX_CHARGES}")
    if len(nci) != len(asl):
        raise text.fail(901, f"{len(nci)} offense codes for {len(asl)} charges in 2.047 ASL")
    charges = []
    for n, (literal, code) in enumerate(zip(asl, nci, strict=True), start=1):
        if len(literal) != 2 or not 1 <= len(literal[1]) <= MAX_TEXT:
            raise text.fail(47, f"charge {n}: needs DOO and a literal of 1-{MAX_TEXT} characters")
        if (
            len(code) != 2
            or not _NCIC.fullmatch(code[0])
            or not code[1].isdigit()
            or not 1 <= int(code[1][:4]) <= 999
        ):
            raise text.fail(901, f"charge {n}: needs a four-digit NCIC code and counts 1-999")
        charges.append(Charge(code[0], literal[1], int(code[1])))
    return charges


def _read_image(record: _Record, parsed: Any, nsr: str) -> tuple[int, FingerImage]:
    where = _where(record.type, record.index)
    if record.type == 4:
        # nistitl keeps what follows LEN and IDC as the record's value: the rest of the header is ours.
        raw = bytes(parsed.value)
        header = struct.pack(">IB", record.end - record.start, 0) + raw
        _, _, imp, fgp, isr, width, height, cga = _TYPE4_HEADER.unpack_from(header)
        idc = int(parsed.IDC)
        position = fgp[0]
        if imp > 3:
            raise TransactionError(f"impression type {imp} outside 0-3", record=where, field="4.003 IMP")
        if position not in IMAGE_POSITIONS:
            raise TransactionError(
                f"finger position {position} outside 1-14", record=where, field="4.004 FGP"
            )
        if isr == 0:
            ppi = NOMINAL_PPI
        elif isr == 1:
            ppi = _in(record, 5, lambda: check_ppi(_ppmm(nsr) * 25.4))
        else:
            raise TransactionError(f"ISR {isr} is neither 0 nor 1", record=where, field="4.005 ISR")
        if cga != _TYPE4_CGA_WSQ:
            raise TransactionError(
                f"compression {cga}; only 1 (WSQ) is accepted", record=where, field="4.008 CGA"
            )
        compression: Compression = "WSQ"
        image = raw[_TYPE4_HEADER.size - 5 :]
        data_tag = 9
    else:
        text = _TextReader(14, record.index, record.fields)
        idc = int(record.fields[2])
        imp = text.number(3, 0, 3)
        position = text.number(13, 1, 14) if "\x1e" not in text.get(13) else -1
        if position == -1:
            raise text.fail(13, "one finger position per record")
        width, height = text.number(6, 1, MAX_IMAGE_SIDE), text.number(7, 1, MAX_IMAGE_SIDE)
        slc = text.number(8, 1, 2)
        thps, tvps = text.number(9, 1, 99999), text.number(10, 1, 99999)
        if thps != tvps:
            raise text.fail(10, f"pixels are not square ({thps} by {tvps})")
        ppi = _in(record, 9, lambda: check_ppi(thps if slc == 1 else thps * 2.54))
        if text.number(12, 0, 99) != 8:
            raise text.fail(12, "8 bits per pixel needed")
        label = text.get(11)
        if label not in _TYPE14_CGA:
            raise text.fail(11, f"compression {label[:20]!r}; WSQ20 or PNG accepted")
        compression = "WSQ" if label == "WSQ20" else "PNG"
        image = record.fields[999]
        data_tag = 999
    _in(record, data_tag, lambda: _check_size(width, height))
    size = _in(record, data_tag, lambda: image_size(image, compression))
    if size != (width, height):
        raise TransactionError(
            f"{compression} image is {size[0]}x{size[1]}, the record says {width}x{height}",
            record=where,
            field=_field_name(record.type, data_tag),
        )
    return idc, FingerImage(position, image, compression, width, height, ppi, imp)


def _ppmm(value: str) -> float:
    try:
        return float(value) if re.fullmatch(r"\d{1,2}\.\d{1,2}", value) else math.nan
    except ValueError:
        return math.nan


_KIND_CODE = {MinutiaKind.RIDGE_ENDING: "A", MinutiaKind.BIFURCATION: "B", MinutiaKind.OTHER: "D"}
_CODE_KIND = {
    "A": MinutiaKind.RIDGE_ENDING,
    "B": MinutiaKind.BIFURCATION,
    "C": MinutiaKind.OTHER,
    "D": MinutiaKind.OTHER,
}


def _read_minutiae(record: _Record, images: dict[int, FingerImage]) -> FingerTemplate:
    text = _TextReader(9, record.index, record.fields)
    idc = int(record.fields[2])
    if idc not in images:
        raise text.fail(2, f"no image record with IDC {idc} for these minutiae")
    image = images[idc]
    if text.get(4) != "S":
        raise text.fail(4, "only the standard format 'S' is read")
    position = text.number(6, 1, 10)
    if position != image.position:
        raise text.fail(6, f"finger {position}, its image (IDC {idc}) is finger {image.position}")
    count = text.number(10, 1, MAX_MINUTIAE)
    rows = text.get(12).split("\x1e")
    if len(rows) != count:
        raise text.fail(12, f"{len(rows)} minutiae, 9.010 MIN says {count}")
    unit = 2540.0 / image.ppi  # 0.01 mm per pixel
    xs, ys, thetas, kinds, qualities = [], [], [], [], []
    for n, row in enumerate(rows, start=1):
        items = row.split("\x1f")
        if (
            len(items) < 4
            or items[0] != str(n)
            or not re.fullmatch(r"\d{11}", items[1])
            or not items[2].isdigit()
        ):
            raise text.fail(12, f"minutia {n}: needs index, XXXXYYYYTTT, quality and type")
        x, y_up, theta = int(items[1][:4]) / unit, int(items[1][4:8]) / unit, int(items[1][8:])
        quality = int(items[2][:3])
        if theta > 359 or quality > 63 or items[3] not in _CODE_KIND:
            raise text.fail(12, f"minutia {n}: angle 0-359, quality 0-63 and type A-D needed")
        x, y = round(x), round(image.height - 1 - y_up)
        if not (0 <= x < image.width and 0 <= y < image.height):
            raise text.fail(12, f"minutia {n} lies outside the {image.width}x{image.height} image")
        xs.append(x)
        ys.append(y)
        thetas.append(math.radians(theta))
        kinds.append(_CODE_KIND[items[3]])
        qualities.append(0 if quality <= 1 else round((63 - quality) * 100 / 61))
    try:
        return FingerTemplate.from_arrays(
            np.stack([xs, ys, thetas], axis=1),
            width=image.width,
            height=image.height,
            kinds=kinds,
            quality=qualities,
            resolution_ppi=image.ppi,
            finger_position=position,
        )
    except TemplateError as error:
        raise text.fail(12, str(error)) from error


# --- writing --------------------------------------------------------------------------------


def _text(value: str, what: str, *, record: str, fname: str, most: int = MAX_TEXT) -> str:
    if not 1 <= len(value) <= most or any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise TransactionError(
            f"{what} {value[:40]!r}: 1-{most} printable ASCII characters", record=record, field=fname
        )
    return value


def write_transaction(t: Transaction, *, image_record: Literal[4, 14] = 14) -> bytes:
    """Writes ``t`` as Type-1, Type-2, one image record per finger (Type-4 or Type-14) and one
    Type-9 per template (IDC of its finger's image). Raises :class:`TransactionError` for what
    the format or the limits cannot hold (Type-4 carries WSQ only)."""
    if image_record not in (4, 14):
        raise TransactionError(f"image record type {image_record}; 4 or 14")
    message = nistitl.Message()
    header = message[0]
    where1 = "Type-1 record 1"
    header.TOT = _text(t.tot, "TOT", record=where1, fname="1.004 TOT", most=16)
    header.VER = t.version
    header.DAT = t.date.strftime("%Y%m%d")
    header.DAI = _text(t.dai, "DAI", record=where1, fname="1.007 DAI", most=54)
    header.ORI = _text(t.ori, "ORI", record=where1, fname="1.008 ORI", most=54)
    header.TCN = _text(t.tcn, "TCN", record=where1, fname="1.009 TCN", most=54)
    header.NSR = header.NTR = "19.69"

    if not 1 <= len(t.charges) <= MAX_CHARGES:
        raise TransactionError(
            f"{len(t.charges)} charges; 1-{MAX_CHARGES}", record="Type-2 record 2", field="2.047 ASL"
        )
    r2 = nistitl.AsciiRecord(2)
    r2.IDC = 0
    r2 += nistitl.Field(2, 45, t.date.strftime("%Y%m%d"))
    asl, nci = nistitl.Field(2, 47), nistitl.Field(2, 901)
    for charge in t.charges:
        if not _NCIC.fullmatch(charge.code) or not 1 <= charge.counts <= 999:
            raise TransactionError(
                f"charge {charge}: a four-digit NCIC code and 1-999 counts",
                record="Type-2 record 2",
                field="2.901 NCI",
            )
        literal = _text(charge.literal, "literal", record="Type-2 record 2", fname="2.047 ASL")
        asl.add_subfields(nistitl.SubField([t.date.strftime("%Y%m%d"), literal]))
        nci.add_subfields(nistitl.SubField([charge.code, str(charge.counts)]))
    r2 += asl
    r2 += nci
    message += r2

    if len(t.images) + len(t.templates) + 1 > MAX_RECORDS:
        raise TransactionError(f"more than {MAX_RECORDS} records", record="transaction")
    idc_of: dict[int, int] = {}
    for n, image in enumerate(t.images, start=1):
        where = _where(image_record, n + 2)
        if image.position in idc_of:
            raise TransactionError(f"finger position {image.position} given twice", record=where)
        idc_of[image.position] = n
        message += _image_record(image, image_record, n, where)
    for n, template in enumerate(t.templates, start=len(t.images) + 3):
        message += _minutiae_record(template, idc_of, _where(9, n))
    data: bytes = message.NIST
    if len(data) > MAX_TRANSACTION_BYTES:
        raise TransactionError(f"{len(data)} bytes, at most {MAX_TRANSACTION_BYTES}", record="transaction")
    return data


def _image_record(image: FingerImage, rtype: int, idc: int, where: str) -> Any:
    fgp = _field_name(rtype, 4 if rtype == 4 else 13)
    if image.position not in IMAGE_POSITIONS:
        raise TransactionError(f"finger position {image.position} outside 1-14", record=where, field=fgp)
    if not 0 <= image.impression <= 3:
        raise TransactionError(
            f"impression type {image.impression} outside 0-3", record=where, field=_field_name(rtype, 3)
        )
    data_field = _field_name(rtype, 9 if rtype == 4 else 999)
    size = _in_where(where, data_field, lambda: image_size(image.data, image.compression))
    _in_where(where, data_field, lambda: _check_size(image.width, image.height))
    if size != (image.width, image.height):
        raise TransactionError(
            f"image is {size[0]}x{size[1]}, declared {image.width}x{image.height}",
            record=where,
            field=data_field,
        )
    _in_where(where, _field_name(rtype, 9 if rtype == 14 else 5), lambda: check_ppi(image.ppi))
    if rtype == 4:
        if image.compression != "WSQ":
            raise TransactionError(
                "Type-4 carries WSQ only; write PNG in Type-14", record=where, field="4.008 CGA"
            )
        record = nistitl.BinaryRecord(4)
        record.IDC = idc
        fgp_bytes = bytes([image.position, 255, 255, 255, 255, 255])
        record.value = (
            _TYPE4_HEADER.pack(
                0, idc, image.impression, fgp_bytes, 0, image.width, image.height, _TYPE4_CGA_WSQ
            )[5:]
            + image.data
        )
        return record
    record = nistitl.AsciiRecord(14)
    record.IDC = idc
    for tag, value in (
        (3, image.impression),
        (4, "XXFEDPRNT"),
        (6, image.width),
        (7, image.height),
        (8, 1),
        (9, image.ppi),
        (10, image.ppi),
        (11, "WSQ20" if image.compression == "WSQ" else "PNG"),
        (12, 8),
        (13, image.position),
    ):
        record += nistitl.Field(14, tag, str(value))
    record += nistitl.BinaryField(14, 999, image.data)
    return record


def _in_where(where: str, fname: str, call: Any) -> Any:
    try:
        return call()
    except TransactionError as error:
        raise TransactionError(error.message, record=where, field=fname) from error


def _minutiae_record(template: FingerTemplate, idc_of: dict[int, int], where: str) -> Any:
    if template.finger_position not in idc_of:
        raise TransactionError(
            f"no image of finger {template.finger_position} for these minutiae",
            record=where,
            field="9.006 FGP",
        )
    if not 1 <= template.count <= MAX_MINUTIAE:
        raise TransactionError(
            f"{template.count} minutiae; 1-{MAX_MINUTIAE}", record=where, field="9.010 MIN"
        )
    unit = 2540.0 / template.resolution_ppi
    record = nistitl.AsciiRecord(9)
    record.IDC = idc_of[template.finger_position]
    for tag, value in (
        (3, "1"),
        (4, "S"),
        (6, str(template.finger_position)),
        (10, str(template.count)),
        (11, "0"),
    ):
        record += nistitl.Field(9, tag, value)
    ofr, fpc, mrc = nistitl.Field(9, 5), nistitl.Field(9, 7), nistitl.Field(9, 12)
    ofr.add_subfields(nistitl.SubField(["FEDPRINT", "A"]))
    fpc.add_subfields(nistitl.SubField(["T", "UC"]))
    for n, ((x, y, theta), kind, quality) in enumerate(
        zip(template.minutiae.tolist(), template.kinds.tolist(), template.quality.tolist(), strict=True),
        start=1,
    ):
        xu, yu = round(round(x) * unit), round((template.height - 1 - round(y)) * unit)
        if not (0 <= xu <= 9999 and 0 <= yu <= 9999):
            raise TransactionError(
                f"minutia {n} at ({x:.0f}, {y:.0f}) beyond 99.99 mm", record=where, field="9.012 MRC"
            )
        degrees = round(math.degrees(theta)) % 360
        q = 1 if quality == 0 else 63 - round(min(quality, 100) * 61 / 100)
        mrc.add_subfields(
            nistitl.SubField(
                [str(n), f"{xu:04d}{yu:04d}{degrees:03d}", str(q), _KIND_CODE[MinutiaKind(kind)]]
            )
        )
    record += ofr
    record += fpc
    record += mrc
    return record
