"""The in-memory minutiae template of one finger, and of a ten-print.

Conventions, fixed for the whole project:
- coordinates are pixels in the image frame: origin at the top-left corner, x to
  the right, y downwards, at the template's resolution (500 ppi nominal);
- angles are radians in [0, 2π), measured counter-clockwise from the x axis *as
  the image is viewed* (the ISO/IEC 19794-2 convention), i.e. a ridge ending that
  points straight up in the picture has angle π/2;
- finger positions are ANSI/NIST FGP codes 1-10.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class TemplateError(ValueError):
    """A template is malformed; the message says where (byte offset, line, field)."""


class MinutiaKind(enum.IntEnum):
    """Minutia type codes as ISO/IEC 19794-2 stores them in two bits."""

    OTHER = 0
    RIDGE_ENDING = 1
    BIFURCATION = 2


@dataclass(frozen=True)
class FingerTemplate:
    """Minutiae of one finger impression.

    ``minutiae`` is ``[M, 3]`` float32 holding ``x, y, theta`` (see module doc);
    ``kinds`` is ``[M]`` uint8 of :class:`MinutiaKind`; ``quality`` is ``[M]`` uint8 in 0-100.
    """

    minutiae: npt.NDArray[np.float32]
    kinds: npt.NDArray[np.uint8]
    quality: npt.NDArray[np.uint8]
    width: int
    height: int
    resolution_ppi: int = 500
    finger_position: int = 0
    impression: int = 0
    finger_quality: int = 100

    def __post_init__(self) -> None:
        m = self.minutiae
        if m.ndim != 2 or m.shape[1] != 3:
            raise TemplateError(f"minutiae must be [M, 3], got {list(m.shape)}")
        if self.kinds.shape != (m.shape[0],) or self.quality.shape != (m.shape[0],):
            raise TemplateError("kinds and quality must have one entry per minutia")
        if not (0 <= self.finger_position <= 10):
            raise TemplateError(f"finger position {self.finger_position} outside 0-10")
        if self.width <= 0 or self.height <= 0:
            raise TemplateError(f"image size {self.width}x{self.height} must be positive")

    @classmethod
    def from_arrays(
        cls,
        xy_theta: npt.ArrayLike,
        *,
        width: int,
        height: int,
        kinds: npt.ArrayLike | None = None,
        quality: npt.ArrayLike | None = None,
        **kw: int,
    ) -> FingerTemplate:
        """Builds a template from ``[M, 3]`` rows of ``x, y, theta``; angles are wrapped to [0, 2π)."""
        m = np.asarray(xy_theta, dtype=np.float32).reshape(-1, 3).copy()
        m[:, 2] = np.mod(m[:, 2], 2 * math.pi).astype(np.float32)
        n = m.shape[0]
        k = np.full(n, MinutiaKind.RIDGE_ENDING, np.uint8) if kinds is None else np.asarray(kinds, np.uint8)
        q = np.full(n, 60, np.uint8) if quality is None else np.asarray(quality, np.uint8)
        return cls(minutiae=m, kinds=k, quality=q, width=width, height=height, **kw)

    @property
    def count(self) -> int:
        """Number of minutiae."""
        return int(self.minutiae.shape[0])


@dataclass(frozen=True)
class TenPrintTemplates:
    """The fingers of one person, keyed by FGP position 1-10; absent fingers are simply missing."""

    fingers: Mapping[int, FingerTemplate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for position, template in self.fingers.items():
            if not 1 <= position <= 10:
                raise TemplateError(f"finger position {position} outside 1-10")
            if template.finger_position not in (0, position):
                raise TemplateError(
                    f"template for position {position} says position {template.finger_position}"
                )
