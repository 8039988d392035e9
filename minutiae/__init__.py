"""Minutiae templates: the in-memory model and the interchange formats (ISO/IEC 19794-2, NIST .xyt).

ANSI/NIST-ITL transactions and their WSQ/PNG images are :mod:`minutiae.an2`, imported on its own
(it brings nistitl, wsq and Pillow, which template users do not need)."""

from minutiae.iso19794_2 import (
    ANGLE_ERROR_BOUND_DEGREES,
    decode_record,
    decode_template,
    encode_record,
    encode_template,
)
from minutiae.template import FingerTemplate, MinutiaKind, TemplateError, TenPrintTemplates
from minutiae.xyt import read_xyt, write_xyt

__all__ = [
    "ANGLE_ERROR_BOUND_DEGREES",
    "FingerTemplate",
    "MinutiaKind",
    "TemplateError",
    "TenPrintTemplates",
    "decode_record",
    "decode_template",
    "encode_record",
    "encode_template",
    "read_xyt",
    "write_xyt",
]
