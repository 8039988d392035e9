"""An evaluation data set in the standard layout, written streaming and in parallel.

For each person: one rolled gallery impression and one plain (or rolled) probe impression of each of the
ten master fingers (the same masters the population uses, :func:`person_masters`), drawn from
their own seeded streams. Probe subjects whose number is in the last ``unenrolled_share`` of
the range get no gallery capture, so some 1:N searches are truly non-mated.

On disk::

    DIR/manifest.csv                      path,subject_id,finger_position,impression,role
    DIR/templates/NNN/PER-xxxxxxx_FF_g.fmr   gallery (rolled), ISO/IEC 19794-2:2005
    DIR/templates/NNN/PER-xxxxxxx_FF_p.fmr   probe (plain)

``NNN`` groups 1000 persons per folder so no folder grows past 20,000 files. Persons are made
in chunks by a process pool; each chunk writes its own files and returns its manifest lines,
which are appended in person order, so the output does not depend on the number of workers and
memory holds one chunk per worker, never the whole set.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from minutiae.dataset import MANIFEST, ManifestRow, manifest_text
from minutiae.iso19794_2 import encode_template
from synthetic.fingers import DIFFICULTIES, impression
from synthetic.population import person_masters, rng_stream

# Stream keys of the evaluation set, apart from the population's (0-5).
_EVAL_GALLERY, _EVAL_PROBE, _EVAL_PLAIN = 16, 17, 18
CHUNK = 250


@dataclass(frozen=True)
class _Chunk:
    directory: Path
    seed: int
    start: int
    stop: int
    difficulty: str
    enrolled: int
    plain_share: float


def _person_id(person: int) -> str:
    return f"PER-{person + 1:07d}"


def _write_file(path: str, data: bytes) -> None:
    # os.open/os.write rather than Path.write_bytes: twenty files per person make the path
    # objects and buffered file wrappers a visible share of the run.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_chunk(chunk: _Chunk) -> str:
    difficulty = DIFFICULTIES[chunk.difficulty]
    rows: list[ManifestRow] = []
    made: set[str] = set()
    for person in range(chunk.start, chunk.stop):
        masters = person_masters(chunk.seed, person)
        folder = f"templates/{person // 1000:03d}"
        if folder not in made:
            (chunk.directory / folder).mkdir(parents=True, exist_ok=True)
            made.add(folder)
        where = f"{chunk.directory}/{folder}"
        subject = _person_id(person)
        # Each person's probe is plain with probability plain_share, by a stream of its own so
        # the choice does not shift any other random draw.
        plain_probe = bool(rng_stream(chunk.seed, _EVAL_PLAIN, person).random() < chunk.plain_share)
        sides = [("probe", "p", _EVAL_PROBE, plain_probe)]
        if person < chunk.enrolled:
            sides.insert(0, ("gallery", "g", _EVAL_GALLERY, False))
        for role, tag, purpose, plain in sides:
            rng = rng_stream(chunk.seed, purpose, person)
            for m in masters:
                quality = float(rng.uniform(*difficulty.quality))
                t = impression(rng, m, quality=quality, difficulty=difficulty, plain=plain)
                name = f"{subject}_{m.finger_position:02d}_{tag}.fmr"
                _write_file(f"{where}/{name}", encode_template(t, impression_type=0 if plain else 1))
                rows.append(ManifestRow(f"{folder}/{name}", subject, m.finger_position, 1, role))
    return manifest_text(rows, header=False)


def write_evaluation_set(
    directory: Path,
    *,
    seed: int,
    subjects: int,
    difficulty: str = "realistic",
    unenrolled_share: float = 0.0,
    plain_probes: bool = True,
    plain_share: float | None = None,
    workers: int | None = None,
    chunk: int = CHUNK,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Writes the set for persons ``0..subjects-1``; returns the number of template files.

    ``workers`` processes (default: the CPU count) each make chunks of ``chunk`` persons; the
    files do not depend on either. ``on_progress(done, subjects)`` is called as chunks
    complete, in person order. ``plain_probes=False`` makes rolled probes, as booking
    stations take them: thresholds for the nodes must be calibrated on that, since
    rolled-vs-rolled impostors score higher. ``plain_share`` (overrides ``plain_probes``) makes
    that share of the persons' probes plain and the rest rolled, chosen per person by seed.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r} is not one of {sorted(DIFFICULTIES)}")
    if not 0.0 <= unenrolled_share < 1.0:
        raise ValueError(f"unenrolled_share {unenrolled_share} outside [0, 1)")
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be at least 1")
    share = (1.0 if plain_probes else 0.0) if plain_share is None else plain_share
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"plain_share {share} outside [0, 1]")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    enrolled = subjects - round(unenrolled_share * subjects)
    chunks = [
        _Chunk(directory, seed, lo, min(subjects, lo + chunk), difficulty, enrolled, share)
        for lo in range(0, subjects, chunk)
    ]
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks)))
    done = 0
    files = 0
    with contextlib.ExitStack() as stack:
        manifest = stack.enter_context((directory / MANIFEST).open("w", encoding="utf-8", newline=""))
        manifest.write(manifest_text([]))
        results: Iterator[str]
        if workers == 1:
            results = map(_write_chunk, chunks)
        else:
            # spawn: forking a process that holds torch threads can deadlock. imap hands the
            # results back in chunk order, so the manifest is written as it grows.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap(_write_chunk, chunks)
        for part, text in zip(chunks, results, strict=True):
            manifest.write(text)
            files += text.count("\n")
            done += part.stop - part.start
            if on_progress is not None:
                on_progress(done, subjects)
    return files
