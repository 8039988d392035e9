"""Synthetic people: descriptors, criminal histories, immigration records and booking charges.

No names and no real persons: a subject is a handful of coarse descriptors and a record.
Offenses come from a small catalogue of NCIC Uniform Offense Codes (NCIC Code Manual,
OFF field), each tagged with its category and the threat level the policy is expected
to give it. The catalogue is the generator's ground truth; the policy engine reads its
own versioned configuration, so a test can check the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from fedprint.records.v1 import records_pb2 as rec


@dataclass(frozen=True)
class Offense:
    """One NCIC offense code with the wording an agency would use and the level it deserves."""

    code: str
    literal: str
    category: str
    level: int


# Level 1: homicide 09xx, kidnapping 10xx, sexual assault 11xx, robbery 12xx,
# aggravated assault 13xx (simple assault 1313 deliberately left out: it is not a Level 1 crime),
# dangerous drugs 35xx. Level 2: arson 20xx, burglary 22xx, larceny 23xx, stolen vehicle 24xx,
# forgery 25xx, fraud 26xx, stolen property 28xx. Level 3: lesser offenses.
OFFENSES: tuple[Offense, ...] = (
    Offense("0901", "HOMICIDE - WILLFUL KILL - FAMILY - GUN", "homicide", 1),
    Offense("0902", "HOMICIDE - WILLFUL KILL - FAMILY - WEAPON", "homicide", 1),
    Offense("0903", "HOMICIDE - WILLFUL KILL - NONFAMILY - GUN", "homicide", 1),
    Offense("0999", "HOMICIDE", "homicide", 1),
    Offense("1005", "KIDNAP MINOR", "kidnapping", 1),
    Offense("1006", "KIDNAP ADULT", "kidnapping", 1),
    Offense("1099", "KIDNAPPING", "kidnapping", 1),
    Offense("1101", "RAPE - GUN", "sexual assault", 1),
    Offense("1103", "RAPE - STRONGARM", "sexual assault", 1),
    Offense("1199", "SEXUAL ASSAULT", "sexual assault", 1),
    Offense("1201", "ROBBERY - BUSINESS - GUN", "robbery", 1),
    Offense("1203", "ROBBERY - BUSINESS - STRONGARM", "robbery", 1),
    Offense("1204", "ROBBERY - STREET - GUN", "robbery", 1),
    Offense("1206", "ROBBERY - STREET - STRONGARM", "robbery", 1),
    Offense("1299", "ROBBERY", "robbery", 1),
    Offense("1301", "AGGRAV ASSLT - FAMILY - GUN", "aggravated assault", 1),
    Offense("1302", "AGGRAV ASSLT - FAMILY - WEAPON", "aggravated assault", 1),
    Offense("1304", "AGGRAV ASSLT - NONFAMILY - GUN", "aggravated assault", 1),
    Offense("1305", "AGGRAV ASSLT - NONFAMILY - WEAPON", "aggravated assault", 1),
    Offense("1314", "AGGRAV ASSLT - GUN", "aggravated assault", 1),
    Offense("1315", "AGGRAV ASSLT - WEAPON", "aggravated assault", 1),
    Offense("3510", "HEROIN - SELL", "dangerous drugs", 1),
    Offense("3512", "HEROIN - POSSESS", "dangerous drugs", 1),
    Offense("3530", "COCAINE - SELL", "dangerous drugs", 1),
    Offense("3532", "COCAINE - POSSESS", "dangerous drugs", 1),
    Offense("3599", "DANGEROUS DRUGS", "dangerous drugs", 1),
    Offense("2099", "ARSON", "arson", 2),
    Offense("2202", "BURGLARY - FORCED ENTRY - RESIDENCE", "burglary", 2),
    Offense("2203", "BURGLARY - FORCED ENTRY - NONRESIDENCE", "burglary", 2),
    Offense("2204", "BURGLARY - NO FORCED ENTRY - RESIDENCE", "burglary", 2),
    Offense("2299", "BURGLARY", "burglary", 2),
    Offense("2399", "LARCENY", "larceny", 2),
    Offense("2404", "VEHICLE THEFT", "stolen vehicle", 2),
    Offense("2499", "STOLEN VEHICLE", "stolen vehicle", 2),
    Offense("2589", "FORGERY", "forgery", 2),
    Offense("2699", "FRAUD", "fraud", 2),
    Offense("2804", "POSSESS STOLEN PROPERTY", "stolen property", 2),
    Offense("2899", "STOLEN PROPERTY", "stolen property", 2),
    Offense("4801", "RESISTING OFFICER", "obstructing police", 3),
    Offense("5311", "DISORDERLY CONDUCT", "public peace", 3),
    Offense("5404", "DRIVING UNDER INFLUENCE LIQUOR", "traffic", 3),
    Offense("5707", "TRESPASSING", "invasion of privacy", 3),
    Offense("7399", "PUBLIC PEACE", "public peace", 3),
)

OFFENSES_BY_CODE: dict[str, Offense] = {o.code: o for o in OFFENSES}
_BY_LEVEL: dict[int, tuple[Offense, ...]] = {
    level: tuple(o for o in OFFENSES if o.level == level) for level in (1, 2, 3)
}

#: Synthetic originating agency identifiers (the "XX" prefix is no real state).
ORIS: tuple[str, ...] = tuple(f"XX{n:07d}" for n in (10000, 20000, 30100, 40000, 51200, 63000))
#: Synthetic port and station codes for immigration encounters.
LOCATIONS: tuple[str, ...] = ("PORT-A01", "PORT-B07", "PORT-C12", "STN-D03", "STN-E19", "CONS-F22")
_BIRTH_COUNTRIES = ("MX", "GT", "HN", "SV", "IN", "CN", "PH", "VN", "NG", "BR", "CO", "UA", "DO", "HT", "CA")

#: Immigration statuses and how often the generator gives them.
IMMIGRATION_STATUS_WEIGHTS: tuple[tuple[int, float], ...] = (
    (rec.NONIMMIGRANT_VISA, 0.20),
    (rec.LAWFUL_PERMANENT_RESIDENT, 0.20),
    (rec.NATURALIZED_CITIZEN, 0.12),
    (rec.REMOVAL_ORDERED, 0.12),
    (rec.OVERSTAY, 0.14),
    (rec.ENTRY_WITHOUT_INSPECTION, 0.14),
    (rec.ASYLUM_PENDING, 0.08),
)

#: Court outcomes of an arrest and their frequencies; only CONVICTED arrests count for the level.
DISPOSITION_WEIGHTS: tuple[tuple[int, float], ...] = (
    (rec.CONVICTED, 0.55),
    (rec.DISMISSED, 0.18),
    (rec.ACQUITTED, 0.07),
    (rec.PENDING, 0.20),
)

#: Every record and booking time lies before this instant, so populations do not depend on the clock.
EPOCH = datetime(2025, 6, 1, tzinfo=UTC)


def level_of(code: str) -> int:
    """The threat level the catalogue assigns to an NCIC code (KeyError for a code not in it)."""
    return OFFENSES_BY_CODE[code].level


def timestamp(at: datetime) -> Timestamp:
    """A protobuf timestamp at whole seconds (so JSON round trips are exact)."""
    ts = Timestamp()
    ts.FromDatetime(at.replace(microsecond=0))
    return ts


def _weighted(rng: np.random.Generator, table: Sequence[tuple[int, float]]) -> int:
    values = [v for v, _ in table]
    weights = np.array([w for _, w in table])
    return values[int(rng.choice(len(values), p=weights / weights.sum()))]


def descriptors(rng: np.random.Generator, *, foreign_born: bool) -> rec.SubjectDescriptors:
    """Coarse synthetic descriptors: sex, year of birth, height, country of birth."""
    sex = ["M", "F", "X"][int(rng.choice(3, p=[0.72, 0.27, 0.01]))]
    mean_height = 176 if sex == "M" else 163
    return rec.SubjectDescriptors(
        sex=sex,
        year_of_birth=int(rng.integers(1955, 2006)),
        height_cm=int(np.clip(round(rng.normal(mean_height, 7)), 140, 210)),
        place_of_birth=str(rng.choice(_BIRTH_COUNTRIES)) if foreign_born else "US",
    )


def offense(rng: np.random.Generator, level: int | None = None) -> Offense:
    """An offense of ``level`` (or of a level drawn as 25 % / 35 % / 40 % for 1 / 2 / 3)."""
    if level is None:
        level = int(rng.choice([1, 2, 3], p=[0.25, 0.35, 0.40]))
    pool = _BY_LEVEL[level]
    return pool[int(rng.integers(len(pool)))]


def charges(rng: np.random.Generator, *, primary_level: int | None = None) -> list[rec.Charge]:
    """One to three charges; the first is of ``primary_level`` when given, the others no more severe."""
    first = offense(rng, primary_level)
    result = [
        rec.Charge(ncic_code=first.code, literal=first.literal, counts=int(rng.choice([1, 1, 1, 2, 3])))
    ]
    for _ in range(int(rng.choice([0, 0, 1, 2]))):
        extra = offense(rng, int(rng.integers(first.level, 4)))
        if all(c.ncic_code != extra.code for c in result):
            result.append(rec.Charge(ncic_code=extra.code, literal=extra.literal, counts=1))
    return result


def criminal_history(
    rng: np.random.Generator, subject_id: str, person: rec.SubjectDescriptors
) -> rec.CriminalHistory:
    """An IAFIS record: one to five arrests over past years, each with charges and a disposition."""
    history = rec.CriminalHistory(subject_id=subject_id)
    history.descriptors.CopyFrom(person)
    days_back = np.sort(rng.integers(30, 20 * 365, int(rng.integers(1, 6))))[::-1]
    for days in days_back:
        arrest = history.arrests.add()
        arrest.arrested_at.CopyFrom(
            timestamp(EPOCH - timedelta(days=int(days), seconds=int(rng.integers(86400))))
        )
        arrest.ori = str(rng.choice(ORIS))
        arrest.charges.extend(charges(rng))
        # An arrest from the last year is more likely still pending.
        pending = days < 365 and rng.uniform() < 0.5
        arrest.disposition = (
            rec.PENDING if pending else rec.Disposition.ValueType(_weighted(rng, DISPOSITION_WEIGHTS))
        )
    return history


def immigration_history(
    rng: np.random.Generator, subject_id: str, person: rec.SubjectDescriptors, *, status: int | None = None
) -> rec.ImmigrationHistory:
    """An IDENT record: a status, one to four encounters consistent with it, and prior removals."""
    chosen = _weighted(rng, IMMIGRATION_STATUS_WEIGHTS) if status is None else status
    record = rec.ImmigrationHistory(subject_id=subject_id, status=rec.ImmigrationStatus.ValueType(chosen))
    record.descriptors.CopyFrom(person)
    if chosen in (rec.ENTRY_WITHOUT_INSPECTION, rec.ASYLUM_PENDING, rec.REMOVAL_ORDERED):
        first, removals = rec.BORDER_APPREHENSION, int(rng.choice([0, 0, 1, 1, 2]))
    else:
        first, removals = rec.VISA_APPLICATION, int(rng.uniform() < 0.03)
    if chosen == rec.NATURALIZED_CITIZEN:
        removals = 0
    later = [rec.PORT_OF_ENTRY, rec.BENEFIT_APPLICATION, rec.PORT_OF_ENTRY, rec.BORDER_APPREHENSION]
    types = [first] + [later[int(rng.integers(len(later)))] for _ in range(int(rng.integers(0, 3)))]
    if chosen in (rec.LAWFUL_PERMANENT_RESIDENT, rec.NATURALIZED_CITIZEN):
        types.append(rec.BENEFIT_APPLICATION)
    types += [rec.REMOVAL] * removals
    days_back = np.sort(rng.integers(60, 25 * 365, len(types)))[::-1]
    for i, (kind, days) in enumerate(zip(types, days_back, strict=True)):
        encounter = record.encounters.add()
        encounter.encounter_id = f"{subject_id}-E{i + 1:02d}"
        encounter.encountered_at.CopyFrom(timestamp(EPOCH - timedelta(days=int(days))))
        encounter.type = kind
        encounter.location = str(rng.choice(LOCATIONS))
    record.prior_removals = removals
    return record


def history_level(history: rec.CriminalHistory) -> int | None:
    """The most severe level among a history's CONVICTED charges (None when there is none)."""
    levels = [
        level_of(c.ncic_code) for a in history.arrests if a.disposition == rec.CONVICTED for c in a.charges
    ]
    return min(levels) if levels else None
