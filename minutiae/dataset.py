"""Data sets in the standard layout: a directory with ``manifest.csv`` beside the template files.

``manifest.csv`` has the header ``path,subject_id,finger_position,impression,role``:

- ``path``: the template file, relative to the manifest's directory (absolute paths work too);
  ``.xyt`` files are NIST text minutiae, anything else is read as an ISO/IEC 19794-2:2005
  record (``.fmr``, ``.iso``, ``.ist``, ...);
- ``subject_id``: who the finger belongs to (any string);
- ``finger_position``: ANSI/NIST FGP code 1-10;
- ``impression``: a number telling captures of one finger apart (any integer);
- ``role``: ``gallery`` (enrolled) or ``probe`` (searched).

An impression of a subject is the set of rows sharing ``(subject_id, impression, role)``: one
ten-print card, or fewer fingers. ``.xyt`` files carry no image size; optional ``width`` and
``height`` columns give it, else :data:`minutiae.xyt.DEFAULT_IMAGE_SIZE` is assumed.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from minutiae.iso19794_2 import decode_template, encode_template
from minutiae.template import FingerTemplate, TemplateError, TenPrintTemplates
from minutiae.xyt import DEFAULT_IMAGE_SIZE, read_xyt, write_xyt

MANIFEST = "manifest.csv"
FIELDS = ("path", "subject_id", "finger_position", "impression", "role")
ROLES = ("gallery", "probe")


class DatasetError(ValueError):
    """The data set is malformed; the message names the file and line."""


@dataclass(frozen=True)
class ManifestRow:
    """One line of ``manifest.csv``."""

    path: str
    subject_id: str
    finger_position: int
    impression: int
    role: str


@dataclass(frozen=True)
class Capture:
    """One impression of a subject's fingers in one role: a ten-print card or part of one."""

    subject_id: str
    impression: int
    role: str
    tenprint: TenPrintTemplates


@dataclass(frozen=True)
class Dataset:
    """A data set read from disk: gallery and probe captures, in manifest order."""

    root: Path
    gallery: tuple[Capture, ...]
    probes: tuple[Capture, ...]

    @property
    def templates(self) -> int:
        """Number of finger templates."""
        return sum(len(c.tenprint.fingers) for c in (*self.gallery, *self.probes))


def read_template(path: Path, *, width: int | None = None, height: int | None = None) -> FingerTemplate:
    """A template file of either format, chosen by extension (``.xyt`` or ISO/IEC 19794-2)."""
    if path.suffix.lower() == ".xyt":
        return read_xyt(path, width=width or DEFAULT_IMAGE_SIZE, height=height or DEFAULT_IMAGE_SIZE)
    return decode_template(path.read_bytes())


def write_template(path: Path, template: FingerTemplate) -> None:
    """Writes ``template`` as ``.xyt`` or ISO/IEC 19794-2, chosen by extension."""
    if path.suffix.lower() == ".xyt":
        path.write_text(write_xyt(template), encoding="ascii")
    else:
        path.write_bytes(encode_template(template))


def manifest_text(rows: Iterable[ManifestRow], *, header: bool = True) -> str:
    """CSV text of manifest rows (with the header line unless ``header`` is False)."""
    lines = [",".join(FIELDS) + "\n"] if header else []
    lines += [f"{r.path},{r.subject_id},{r.finger_position},{r.impression},{r.role}\n" for r in rows]
    return "".join(lines)


def read_manifest(directory: Path) -> list[tuple[int, ManifestRow, dict[str, str]]]:
    """The rows of ``directory/manifest.csv`` with their line numbers and raw fields, validated."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: no such file (a data set is a directory with {MANIFEST})")
    with manifest.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [name for name in FIELDS if name not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{manifest} line 1: missing columns {missing}; need {','.join(FIELDS)}")
        rows = []
        for line, raw in enumerate(reader, start=2):
            where = f"{manifest} line {line}"
            try:
                position, impression = int(raw["finger_position"]), int(raw["impression"])
            except (TypeError, ValueError):
                raise DatasetError(f"{where}: finger_position and impression must be integers") from None
            if not 1 <= position <= 10:
                raise DatasetError(f"{where}: finger_position {position} outside 1-10")
            role = (raw["role"] or "").strip()
            if role not in ROLES:
                raise DatasetError(f"{where}: role {role!r} is neither 'gallery' nor 'probe'")
            if not raw["path"] or not raw["subject_id"]:
                raise DatasetError(f"{where}: path and subject_id must not be empty")
            rows.append((line, ManifestRow(raw["path"], raw["subject_id"], position, impression, role), raw))
    return rows


@dataclass(frozen=True)
class CaptureRef:
    """Where one capture's templates are listed: its key and its manifest rows (not yet read)."""

    subject_id: str
    impression: int
    role: str
    rows: tuple[tuple[int, ManifestRow, dict[str, str]], ...]


def capture_refs(directory: Path) -> list[CaptureRef]:
    """The captures of a data set in manifest order, without reading any template file.

    For data sets too large to hold in memory: read the captures a step needs with
    :func:`load_capture`. Raises :class:`DatasetError` for a finger listed twice in one capture.
    """
    directory = Path(directory)
    grouped: dict[tuple[str, int, str], list[tuple[int, ManifestRow, dict[str, str]]]] = {}
    for line, row, raw in read_manifest(directory):
        rows = grouped.setdefault((row.subject_id, row.impression, row.role), [])
        if any(r.finger_position == row.finger_position for _, r, _ in rows):
            where = f"{directory / MANIFEST} line {line}"
            raise DatasetError(f"{where}: finger {row.finger_position} appears twice in this capture")
        rows.append((line, row, raw))
    return [CaptureRef(s, i, role, tuple(rows)) for (s, i, role), rows in grouped.items()]


def enrolled_captures(refs: Sequence[CaptureRef]) -> list[CaptureRef]:
    """Each subject's first gallery capture, in manifest order: what a node enrols of a data set
    (one ten-print per subject; later gallery captures are ignored)."""
    seen: set[str] = set()
    out: list[CaptureRef] = []
    for ref in refs:
        if ref.role == "gallery" and ref.subject_id not in seen:
            seen.add(ref.subject_id)
            out.append(ref)
    return out


def load_capture(directory: Path, ref: CaptureRef) -> Capture:
    """Reads the templates of one capture; :class:`DatasetError` names the manifest line of a
    missing or malformed file."""
    directory = Path(directory)
    fingers: dict[int, FingerTemplate] = {}
    for line, row, raw in ref.rows:
        where = f"{directory / MANIFEST} line {line}"
        path = Path(row.path) if Path(row.path).is_absolute() else directory / row.path
        try:
            width = int(raw["width"]) if raw.get("width") else None
            height = int(raw["height"]) if raw.get("height") else None
            template = read_template(path, width=width, height=height)
        except FileNotFoundError:
            raise DatasetError(f"{where}: {path}: no such file") from None
        except (TemplateError, ValueError) as e:
            raise DatasetError(f"{where}: {path}: {e}") from e
        if template.finger_position not in (0, row.finger_position):
            raise DatasetError(
                f"{where}: {path} says finger {template.finger_position}, the manifest {row.finger_position}"
            )
        # The template's own impression field is the ISO impression *type*; keep it.
        fingers[row.finger_position] = replace(template, finger_position=row.finger_position)
    return Capture(
        ref.subject_id, ref.impression, ref.role, TenPrintTemplates(fingers=dict(sorted(fingers.items())))
    )


def read_dataset(directory: Path) -> Dataset:
    """Reads every template of a data set and groups them into captures.

    Raises :class:`DatasetError` naming the manifest line for a bad row, a missing or
    malformed template file, or a finger listed twice in one capture.
    """
    directory = Path(directory)
    made = [load_capture(directory, ref) for ref in capture_refs(directory)]
    return Dataset(
        root=directory,
        gallery=tuple(c for c in made if c.role == "gallery"),
        probes=tuple(c for c in made if c.role == "probe"),
    )


def merge_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """One data set of several: subject ids become ``"<i>:<id>"`` (``i`` the set's position),
    so subjects of different sets, which may share ids, stay apart. One set is returned as is."""
    if len(datasets) == 1:
        return datasets[0]
    if not datasets:
        raise DatasetError("no data set to merge")

    def renamed(i: int, captures: tuple[Capture, ...]) -> tuple[Capture, ...]:
        return tuple(replace(c, subject_id=f"{i}:{c.subject_id}") for c in captures)

    return Dataset(
        root=datasets[0].root,
        gallery=tuple(c for i, d in enumerate(datasets) for c in renamed(i, d.gallery)),
        probes=tuple(c for i, d in enumerate(datasets) for c in renamed(i, d.probes)),
    )
