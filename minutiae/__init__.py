"""Minutiae templates: the in-memory model and the interchange formats (ISO/IEC 19794-2, NIST .xyt)."""

from minutiae.template import FingerTemplate, MinutiaKind, TemplateError, TenPrintTemplates

__all__ = ["FingerTemplate", "MinutiaKind", "TemplateError", "TenPrintTemplates"]
