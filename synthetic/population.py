"""A synthetic population: two overlapping galleries (IAFIS, IDENT), bookings, and the ground truth.

Every person has ten master fingers. A person may be enrolled in IAFIS (criminal
history), in IDENT (immigration record), in both or in neither; each enrollment is its
own impression of the masters, and each booking is yet another fresh impression, so no
search ever meets a copy of what is enrolled.

Determinism: everything derives from ``seed`` through independent numpy streams keyed
by ``(seed, purpose, index)``, so a person's fingers do not depend on how many persons
or bookings are generated around them, and the same arguments give byte-identical files.

On disk (:func:`write_population`)::

    DIR/population.json          seed, counts, generator version
    DIR/iafis/manifest.csv       path,subject_id,finger_position,impression,role (role "gallery")
    DIR/iafis/templates/*.fmr    one single-view ISO/IEC 19794-2:2005 record per finger
    DIR/iafis/records.jsonl      CriminalHistory as protobuf JSON, one per line
    DIR/ident/...                the same for IDENT, with ImmigrationHistory records
    DIR/bookings.jsonl           Booking as protobuf JSON, one per line
    DIR/ground_truth.csv         per booking: tcn,person_id,iafis_subject_id,ident_subject_id,
                                 expected_level,expect_notification,ident_status
    DIR/gallery_truth.csv        gallery,subject_id,person_id: which person each enrolled subject is

The gallery directories are exactly what a node loads; the truth files are kept apart
so that nothing a node reads tells it who is who.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.records.v1 import records_pb2 as rec
from fedprint.tenprint import tenprint_to_proto
from minutiae.iso19794_2 import decode_template, encode_template
from minutiae.template import FingerTemplate, TemplateError, TenPrintTemplates
from synthetic import people
from synthetic.fingers import DIFFICULTIES, Difficulty, MasterFinger, impression, master_with_flow

GENERATOR_VERSION = "3"

#: Share of persons in each gallery category; the rest are in neither gallery.
BOTH_SHARE, IAFIS_ONLY_SHARE, IDENT_ONLY_SHARE = 0.15, 0.25, 0.20
#: Share of booking fingers that cannot be printed (bandaged, injured).
UNABLE_TO_PRINT_RATE = 0.02
#: A booking always keeps at least this many printed fingers.
MIN_BOOKING_FINGERS = 6

# Stream keys: each purpose draws from its own generator, keyed by (seed, purpose, index).
_PLAN, _MASTERS, _IAFIS_ENROL, _IDENT_ENROL, _PERSON, _BOOKING = range(6)

CATEGORIES = ("both", "iafis_only", "ident_only", "neither")


@dataclass(frozen=True)
class GalleryEntry:
    """One enrolled subject: its gallery id, the person it is (ground truth), fingers and record."""

    subject_id: str
    person_id: str
    tenprint: TenPrintTemplates
    record: rec.CriminalHistory | rec.ImmigrationHistory

    def enroll_request(self) -> gal.EnrollRequest:
        """The ``Enroll`` message that puts this subject into its gallery."""
        request = gal.EnrollRequest(subject_id=self.subject_id, tenprint=tenprint_to_proto(self.tenprint))
        if isinstance(self.record, rec.CriminalHistory):
            request.criminal_history.CopyFrom(self.record)
        else:
            request.immigration_history.CopyFrom(self.record)
        return request


@dataclass(frozen=True)
class GroundTruth:
    """What a correct system concludes about one booking."""

    tcn: str
    person_id: str
    iafis_subject_id: str | None
    ident_subject_id: str | None
    expected_level: int
    expect_notification: bool
    ident_status: int | None


@dataclass(frozen=True)
class SyntheticBooking:
    """A booking as the jail sends it (ISO templates of a fresh impression) and its ground truth."""

    booking: booking_pb2.Booking
    truth: GroundTruth


@dataclass(frozen=True)
class Population:
    """Two galleries, the bookings to search against them, and the seed that made them."""

    seed: int
    iafis: list[GalleryEntry]
    ident: list[GalleryEntry]
    bookings: list[SyntheticBooking]
    persons: int = 0


def rng_stream(seed: int, purpose: int, index: int = 0) -> np.random.Generator:
    """The random stream of one ``purpose`` (a stream key) and ``index`` (a person) under ``seed``:
    independent of every other stream, so adding data of one kind never shifts another."""
    return np.random.default_rng([seed, purpose, index])


def _quantised(t: FingerTemplate) -> FingerTemplate:
    """The template as it reads back from ISO/IEC 19794-2, so memory and disk hold the same thing."""
    return decode_template(encode_template(t))


def person_master_fingers(seed: int, person: int) -> list[MasterFinger]:
    """The ten master fingers (FGP 1-10) of person number ``person``, with their ridge flow."""
    rng = rng_stream(seed, _MASTERS, person)
    return [master_with_flow(rng, position) for position in range(1, 11)]


def person_masters(seed: int, person: int) -> list[FingerTemplate]:
    """The ten master minutiae sets of person number ``person``: the same in every output."""
    return [m.template for m in person_master_fingers(seed, person)]


def _enrol(
    seed: int, purpose: int, person: int, masters: list[FingerTemplate], difficulty: Difficulty
) -> TenPrintTemplates:
    rng = rng_stream(seed, purpose, person)
    return TenPrintTemplates(
        fingers={
            m.finger_position: _quantised(
                impression(rng, m, quality=float(rng.uniform(*difficulty.quality)), difficulty=difficulty)
            )
            for m in masters
        }
    )


def _split(rng: np.random.Generator, persons: int) -> dict[str, list[int]]:
    counts = [max(1, round(share * persons)) for share in (BOTH_SHARE, IAFIS_ONLY_SHARE, IDENT_ONLY_SHARE)]
    order = rng.permutation(persons).tolist()
    groups: dict[str, list[int]] = {}
    start = 0
    for name, n in zip(CATEGORIES[:3], counts, strict=True):
        groups[name] = sorted(order[start : start + n])
        start += n
    groups["neither"] = sorted(order[start:])
    return groups


def generate_population(
    *,
    seed: int,
    persons: int,
    bookings: int,
    on_progress: Callable[[int, int], None] | None = None,
    difficulty: Difficulty | str = "realistic",
) -> Population:
    """Generates galleries that overlap on purpose, bookings covering every case, and the truth.

    ``persons`` (at least 5) are split 15 % in both galleries, 25 % IAFIS only, 20 % IDENT
    only, the rest in neither. The first bookings are chosen so that every category, every
    charge level and a naturalized citizen (notification suppressed) appear; the rest are
    drawn at random (categories 25/25/20/30 %). ``on_progress(done, total)`` is called
    after each enrolled subject and each booking. ``difficulty`` is a preset name or a
    :class:`~synthetic.fingers.Difficulty`; enrollments and bookings are rolled impressions.
    """
    if isinstance(difficulty, str):
        difficulty = DIFFICULTIES[difficulty]
    if persons < 5:
        raise ValueError(f"persons={persons}: at least 5 are needed to populate every category")
    if bookings < 0:
        raise ValueError(f"bookings={bookings} must not be negative")
    plan = rng_stream(seed, _PLAN)
    groups = _split(plan, persons)
    in_iafis = sorted(groups["both"] + groups["iafis_only"])
    in_ident = sorted(groups["both"] + groups["ident_only"])
    iafis_ids = {
        p: f"UCN-{n:07d}" for p, n in zip(in_iafis, plan.permutation(len(in_iafis)) + 1, strict=True)
    }
    ident_ids = {
        p: f"FIN-{n:07d}" for p, n in zip(in_ident, plan.permutation(len(in_ident)) + 1, strict=True)
    }
    # At least one naturalized citizen in IDENT, so that suppression is always exercised.
    forced_naturalized = int(plan.choice(groups["ident_only"]))

    total = len(in_iafis) + len(in_ident) + bookings
    done = 0
    masters_cache: dict[int, list[FingerTemplate]] = {}
    descriptors_cache: dict[int, rec.SubjectDescriptors] = {}

    def masters_of(person: int) -> list[FingerTemplate]:
        if person not in masters_cache:
            masters_cache[person] = person_masters(seed, person)
        return masters_cache[person]

    def descriptors_of(person: int) -> rec.SubjectDescriptors:
        if person not in descriptors_cache:
            rng = rng_stream(seed, _PERSON, person)
            descriptors_cache[person] = people.descriptors(
                rng, foreign_born=person in ident_ids or rng.uniform() < 0.1
            )
        return descriptors_cache[person]

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    iafis: list[GalleryEntry] = []
    for person in in_iafis:
        rng = rng_stream(seed, _PERSON, 1_000_000 + person)
        record: rec.CriminalHistory | rec.ImmigrationHistory = people.criminal_history(
            rng, iafis_ids[person], descriptors_of(person)
        )
        tenprint = _enrol(seed, _IAFIS_ENROL, person, masters_of(person), difficulty)
        iafis.append(GalleryEntry(iafis_ids[person], _person_id(person), tenprint, record))
        tick()

    ident: list[GalleryEntry] = []
    for person in in_ident:
        rng = rng_stream(seed, _PERSON, 2_000_000 + person)
        status = rec.NATURALIZED_CITIZEN if person == forced_naturalized else None
        record = people.immigration_history(rng, ident_ids[person], descriptors_of(person), status=status)
        tenprint = _enrol(seed, _IDENT_ENROL, person, masters_of(person), difficulty)
        ident.append(GalleryEntry(ident_ids[person], _person_id(person), tenprint, record))
        tick()

    iafis_by_person = {int(e.person_id[4:]) - 1: e for e in iafis}
    ident_by_person = {int(e.person_id[4:]) - 1: e for e in ident}

    # Who is booked, and with charges of which level: the first five cover every case.
    forced: list[tuple[int, int | None]] = [
        (int(plan.choice(groups["both"])), 1),
        (int(plan.choice(groups["iafis_only"])), 2),
        (int(plan.choice(groups["ident_only"])), None),
        (int(plan.choice(groups["neither"])), 3),
        (forced_naturalized, None),
    ]
    weights = np.array([0.25, 0.25, 0.20, 0.30])
    booked: list[tuple[int, int | None]] = []
    for b in range(bookings):
        if b < len(forced):
            booked.append(forced[b])
        else:
            category = CATEGORIES[int(plan.choice(4, p=weights))]
            booked.append((int(plan.choice(groups[category])), None))

    result: list[SyntheticBooking] = []
    for b, (person, level) in enumerate(booked):
        result.append(
            _booking(
                seed,
                b,
                person,
                level,
                masters_of(person),
                descriptors_of(person),
                iafis_by_person.get(person),
                ident_by_person.get(person),
                difficulty,
            )
        )
        tick()
    return Population(seed=seed, iafis=iafis, ident=ident, bookings=result, persons=persons)


def _person_id(person: int) -> str:
    return f"PER-{person + 1:07d}"


def _booking(
    seed: int,
    index: int,
    person: int,
    level: int | None,
    masters: list[FingerTemplate],
    subject: rec.SubjectDescriptors,
    iafis: GalleryEntry | None,
    ident: GalleryEntry | None,
    difficulty: Difficulty,
) -> SyntheticBooking:
    rng = rng_stream(seed, _BOOKING, index)
    booking = booking_pb2.Booking(
        tcn=f"TCN-{seed}-{index + 1:06d}", ori=str(rng.choice(people.ORIS)), subject=subject
    )
    # The booking officer measures height again: a centimetre or two off the record.
    booking.subject.height_cm = int(subject.height_cm + rng.integers(-2, 3))
    booking.booking_time.CopyFrom(
        people.timestamp(people.EPOCH + timedelta(minutes=int(rng.integers(0, 60 * 24 * 90))))
    )
    booking.charges.extend(people.charges(rng, primary_level=level))

    unable = np.flatnonzero(rng.uniform(size=10) < UNABLE_TO_PRINT_RATE)[: 10 - MIN_BOOKING_FINGERS]
    absent = {int(i) + 1: bio.UNABLE_TO_PRINT for i in unable}
    fingers = {
        m.finger_position: impression(
            rng, m, quality=float(rng.uniform(*difficulty.quality)), difficulty=difficulty
        )
        for m in masters
        if m.finger_position not in absent
    }
    booking.tenprint.CopyFrom(tenprint_to_proto(TenPrintTemplates(fingers=fingers), absent=absent))

    levels = [people.level_of(c.ncic_code) for c in booking.charges]
    if iafis is not None:
        assert isinstance(iafis.record, rec.CriminalHistory)
        convicted = people.history_level(iafis.record)
        if convicted is not None:
            levels.append(convicted)
    status = (
        ident.record.status
        if ident is not None and isinstance(ident.record, rec.ImmigrationHistory)
        else None
    )
    truth = GroundTruth(
        tcn=booking.tcn,
        person_id=_person_id(person),
        iafis_subject_id=iafis.subject_id if iafis else None,
        ident_subject_id=ident.subject_id if ident else None,
        expected_level=min(levels),
        expect_notification=status is not None and status != rec.NATURALIZED_CITIZEN,
        ident_status=int(status) if status is not None else None,
    )
    return SyntheticBooking(booking=booking, truth=truth)


# --- files ------------------------------------------------------------------------------------------

_MANIFEST_FIELDS = ("path", "subject_id", "finger_position", "impression", "role")
_TRUTH_FIELDS = (
    "tcn",
    "person_id",
    "iafis_subject_id",
    "ident_subject_id",
    "expected_level",
    "expect_notification",
    "ident_status",
)


def _csv_text(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _json_line(message: rec.CriminalHistory | rec.ImmigrationHistory | booking_pb2.Booking) -> str:
    return json_format.MessageToJson(message, indent=None, sort_keys=True) + "\n"


def _write_gallery(directory: Path, entries: list[GalleryEntry]) -> None:
    templates = directory / "templates"
    templates.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in entries:
        for position, template in sorted(entry.tenprint.fingers.items()):
            name = f"templates/{entry.subject_id}_{position:02d}.fmr"
            (directory / name).write_bytes(encode_template(template))
            rows.append((name, entry.subject_id, position, template.impression, "gallery"))
    (directory / "manifest.csv").write_text(_csv_text(_MANIFEST_FIELDS, rows), encoding="utf-8")
    (directory / "records.jsonl").write_text("".join(_json_line(e.record) for e in entries), encoding="utf-8")


def write_population(pop: Population, directory: Path) -> None:
    """Writes the population in the layout described in the module docstring."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = {
        "generator": "fedprint.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": pop.seed,
        "persons": pop.persons,
        "iafis_subjects": len(pop.iafis),
        "ident_subjects": len(pop.ident),
        "bookings": len(pop.bookings),
    }
    (directory / "population.json").write_text(
        json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    _write_gallery(directory / "iafis", pop.iafis)
    _write_gallery(directory / "ident", pop.ident)
    (directory / "bookings.jsonl").write_text(
        "".join(_json_line(b.booking) for b in pop.bookings), encoding="utf-8"
    )
    truth_rows = [
        (
            t.tcn,
            t.person_id,
            t.iafis_subject_id or "",
            t.ident_subject_id or "",
            t.expected_level,
            "true" if t.expect_notification else "false",
            rec.ImmigrationStatus.Name(t.ident_status) if t.ident_status is not None else "",  # type: ignore[arg-type]
        )
        for t in (b.truth for b in pop.bookings)
    ]
    (directory / "ground_truth.csv").write_text(_csv_text(_TRUTH_FIELDS, truth_rows), encoding="utf-8")
    gallery_rows = [("iafis", e.subject_id, e.person_id) for e in pop.iafis]
    gallery_rows += [("ident", e.subject_id, e.person_id) for e in pop.ident]
    (directory / "gallery_truth.csv").write_text(
        _csv_text(("gallery", "subject_id", "person_id"), gallery_rows), encoding="utf-8"
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_gallery(
    directory: Path,
    record_type: type[rec.CriminalHistory] | type[rec.ImmigrationHistory],
    persons: Mapping[str, str],
) -> list[GalleryEntry]:
    fingers: dict[str, dict[int, FingerTemplate]] = {}
    for line, row in enumerate(_read_csv(directory / "manifest.csv"), start=2):
        position = int(row["finger_position"])
        path = directory / row["path"]
        try:
            template = decode_template(path.read_bytes())
        except TemplateError as e:
            raise TemplateError(f"{directory / 'manifest.csv'} line {line}: {path}: {e}") from e
        if template.finger_position not in (0, position):
            raise TemplateError(f"{path}: record says finger {template.finger_position}, manifest {position}")
        fingers.setdefault(row["subject_id"], {})[position] = replace(template, finger_position=position)
    entries = []
    for text in (directory / "records.jsonl").read_text(encoding="utf-8").splitlines():
        record = json_format.Parse(text, record_type())
        entries.append(
            GalleryEntry(
                subject_id=record.subject_id,
                person_id=persons[record.subject_id],
                tenprint=TenPrintTemplates(fingers=dict(sorted(fingers.get(record.subject_id, {}).items()))),
                record=record,
            )
        )
    return entries


def read_population(directory: Path) -> Population:
    """Reads back what :func:`write_population` wrote."""
    directory = Path(directory)
    summary = json.loads((directory / "population.json").read_text(encoding="utf-8"))
    if summary.get("generator_version") != GENERATOR_VERSION:
        found = summary.get("generator_version")
        raise ValueError(f"{directory}: generator version {found!r}, expected {GENERATOR_VERSION!r}")
    gallery_truth = _read_csv(directory / "gallery_truth.csv")
    iafis_persons = {r["subject_id"]: r["person_id"] for r in gallery_truth if r["gallery"] == "iafis"}
    ident_persons = {r["subject_id"]: r["person_id"] for r in gallery_truth if r["gallery"] == "ident"}
    truths = {}
    for row in _read_csv(directory / "ground_truth.csv"):
        truths[row["tcn"]] = GroundTruth(
            tcn=row["tcn"],
            person_id=row["person_id"],
            iafis_subject_id=row["iafis_subject_id"] or None,
            ident_subject_id=row["ident_subject_id"] or None,
            expected_level=int(row["expected_level"]),
            expect_notification=row["expect_notification"] == "true",
            ident_status=rec.ImmigrationStatus.Value(row["ident_status"]) if row["ident_status"] else None,
        )
    bookings = []
    for line in (directory / "bookings.jsonl").read_text(encoding="utf-8").splitlines():
        booking = json_format.Parse(line, booking_pb2.Booking())
        bookings.append(SyntheticBooking(booking=booking, truth=truths[booking.tcn]))
    return Population(
        seed=int(summary["seed"]),
        iafis=_read_gallery(directory / "iafis", rec.CriminalHistory, iafis_persons),
        ident=_read_gallery(directory / "ident", rec.ImmigrationHistory, ident_persons),
        bookings=bookings,
        persons=int(summary.get("persons", 0)),
    )
