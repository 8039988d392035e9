"""The extractor interface: images in, minutiae templates with a quality and a provenance out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from minutiae.template import FingerTemplate


@dataclass(frozen=True)
class ExtractedFinger:
    """What an extractor made of one image.

    ``template`` holds the minutiae in the project's conventions (:mod:`minutiae.template`:
    pixels, y down, angles counter-clockwise as viewed); ``quality`` is the finger's quality
    in 0-100 (the extractor's own estimate); ``extractor`` and ``version`` say what made it, so a
    gallery knows which templates to re-extract when the extractor changes.
    """

    template: FingerTemplate
    quality: int
    extractor: str
    version: str


@runtime_checkable
class Extractor(Protocol):
    """Turns grayscale fingerprint images (``[H, W]`` uint8, dark ridges) into minutiae."""

    name: str
    version: str

    def extract(self, images: Sequence[npt.NDArray[np.uint8]], ppi: int) -> list[ExtractedFinger]:
        """One :class:`ExtractedFinger` per image, in order; ``ppi`` is the images' resolution."""
        ...
