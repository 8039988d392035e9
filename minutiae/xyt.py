"""NIST ``.xyt`` minutiae files, as NBIS (``mindtct``, read by ``bozorth3``) writes them.

One minutia per line, ``x y theta quality``, whitespace-separated integers. NBIS's own
conventions (``lfs2nist_minutia_XYT`` in NBIS ``xytreps.c``) differ from ISO/IEC 19794-2
and from this project's :class:`~minutiae.template.FingerTemplate` in two ways, both
undone here so that the rest of the project sees one convention:

- **y axis**: origin at the bottom-left, y upwards. NBIS computes ``y_xyt = height - y_image``
  (not ``height - 1 - y_image``), so a file's y runs over 1..height. We follow NBIS
  exactly, because the point of this module is to exchange files with NBIS tools: a
  minutia written here and one written by ``mindtct`` for the same pixel must agree.
- **theta**: degrees in 0-359, counter-clockwise from the x axis as viewed (as ISO), but
  pointing *away from* the ridge ending or bifurcation valley, i.e. the opposite of the
  ISO direction: ``theta_xyt = theta_iso + 180`` (mod 360).

The file carries no image size, no finger position and no minutia type. The reader
therefore takes the image size as parameters (needed to undo the y flip); when it is
not known, the default 512x512 is the size of NIST Special Database 4 images, the most
common source of ``.xyt`` files, and any minutia the assumed size cannot hold is
rejected rather than silently misplaced. Minutia types come back as
:attr:`MinutiaKind.OTHER`. The quality column is optional on reading (``bozorth3``
accepts three columns); a missing quality reads as 0, "not reported".

Round trip: integer pixel coordinates are exact; angles are rounded to whole degrees,
so the error is at most 0.5 degree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minutiae.template import FingerTemplate, MinutiaKind, TemplateError

#: Image size assumed when the caller does not know it (NIST SD4 images are 512x512).
DEFAULT_IMAGE_SIZE = 512


def read_xyt(
    text_or_path: str | os.PathLike[str],
    *,
    width: int = DEFAULT_IMAGE_SIZE,
    height: int = DEFAULT_IMAGE_SIZE,
    finger_position: int = 0,
    resolution_ppi: int = 500,
) -> FingerTemplate:
    """Reads a ``.xyt`` file; a ``str`` is the file's text, a path-like object names the file.

    ``height`` undoes NBIS's bottom-left origin (``y_image = height - y_xyt``); pass the
    real image size when known. An empty file is a template with no minutiae (what
    ``mindtct`` writes when it finds none). Malformed lines raise :class:`TemplateError`
    naming the line number.
    """
    if isinstance(text_or_path, str):
        text, source = text_or_path, "<text>"
    else:
        path = Path(text_or_path)
        text, source = path.read_text(encoding="ascii", errors="replace"), str(path)

    rows: list[tuple[int, int, int, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (3, 4):
            hint = " (to read a file, pass a pathlib.Path)" if len(fields) == 1 and number == 1 else ""
            raise TemplateError(
                f"{source} line {number}: expected 'x y theta [quality]', got {len(fields)} fields{hint}"
            )
        try:
            values = [int(f) for f in fields]
        except ValueError:
            raise TemplateError(
                f"{source} line {number}: fields must be integers, got {line.strip()!r}"
            ) from None
        x, y_xyt, theta = values[0], values[1], values[2]
        quality = values[3] if len(values) == 4 else 0
        y = height - y_xyt
        if not (0 <= x < width and 0 <= y < height):
            raise TemplateError(
                f"{source} line {number}: minutia ({x}, {y_xyt}) lies outside a {width}x{height} image "
                f"(pass the real image size)"
            )
        if not 0 <= quality <= 100:
            raise TemplateError(f"{source} line {number}: quality {quality} outside 0-100")
        rows.append((x, y, theta, quality))

    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    # NBIS points theta away from the minutia; ISO (and this project) points along the ridge.
    theta_rad = np.deg2rad(np.mod(table[:, 2] - 180, 360).astype(np.float64))
    return FingerTemplate(
        minutiae=np.stack([table[:, 0], table[:, 1], theta_rad], axis=1).astype(np.float32),
        kinds=np.full(len(rows), MinutiaKind.OTHER, np.uint8),
        quality=table[:, 3].astype(np.uint8),
        width=width,
        height=height,
        resolution_ppi=resolution_ppi,
        finger_position=finger_position,
    )


def write_xyt(template: FingerTemplate) -> str:
    """Writes a template as ``.xyt`` text, one ``x y theta quality`` line per minutia, in NBIS conventions.

    Coordinates are rounded to whole pixels and must lie in the image; minutia types,
    finger position and image size are not part of the format and are dropped.
    """
    if not np.all(np.isfinite(template.minutiae)):
        raise TemplateError("minutiae hold NaN or infinity")
    x = np.rint(template.minutiae[:, 0]).astype(np.int64)
    y = np.rint(template.minutiae[:, 1]).astype(np.int64)
    bad = (x < 0) | (y < 0) | (x >= template.width) | (y >= template.height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TemplateError(
            f"minutia {i} at ({x[i]}, {y[i]}) lies outside the {template.width}x{template.height} image"
        )
    degrees = np.rint(np.rad2deg(template.minutiae[:, 2].astype(np.float64))).astype(np.int64)
    theta = np.mod(degrees + 180, 360)
    y_xyt = template.height - y
    lines = [
        f"{xi} {yi} {ti} {qi}\n"
        for xi, yi, ti, qi in zip(
            x.tolist(), y_xyt.tolist(), theta.tolist(), template.quality.tolist(), strict=True
        )
    ]
    return "".join(lines)
