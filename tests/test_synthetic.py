"""The synthetic population: deterministic, honest impressions, every case present, truth consistent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.records.v1 import records_pb2 as rec
from fedprint.tenprint import decode_tenprint
from minutiae import FingerTemplate, TenPrintTemplates
from synthetic.fingers import MIN_IMPRESSION_MINUTIAE, MIN_SPACING, _spaced_points, impression, master_finger
from synthetic.people import OFFENSES, history_level, level_of
from synthetic.population import (
    MIN_BOOKING_FINGERS,
    Population,
    generate_population,
    read_population,
    tenprint_to_proto,
    write_population,
)

PERSONS, BOOKINGS = 40, 12


@pytest.fixture(scope="module")
def population() -> Population:
    return generate_population(seed=7, persons=PERSONS, bookings=BOOKINGS)


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def same_template(a: FingerTemplate, b: FingerTemplate) -> bool:
    return (
        np.array_equal(a.minutiae, b.minutiae)
        and np.array_equal(a.kinds, b.kinds)
        and np.array_equal(a.quality, b.quality)
        and (a.width, a.height, a.resolution_ppi, a.finger_position, a.impression, a.finger_quality)
        == (b.width, b.height, b.resolution_ppi, b.finger_position, b.impression, b.finger_quality)
    )


def same_tenprint(a: TenPrintTemplates, b: TenPrintTemplates) -> bool:
    return a.fingers.keys() == b.fingers.keys() and all(
        same_template(a.fingers[k], b.fingers[k]) for k in a.fingers
    )


# --- fingers -----------------------------------------------------------------------------------------


def test_master_fingers_are_plausible() -> None:
    for i in range(30):
        m = master_finger(np.random.default_rng(i), 1 + i % 10)
        assert 25 <= m.count <= 90
        assert (m.width, m.height, m.resolution_ppi) == (400, 500, 500)
        xy = m.minutiae[:, :2]
        assert (xy >= 0).all() and (xy[:, 0] < 400).all() and (xy[:, 1] < 500).all()
        d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        assert d.min() >= 10.0  # minimum spacing of about a ridge period


def test_spaced_points_match_the_all_pairs_definition() -> None:
    # The sweep over x-sorted candidates must keep exactly the candidates that no earlier
    # candidate comes within MIN_SPACING of, as the full pairwise matrix says.
    for seed in range(200):
        count = 25 + seed % 66
        scale = 0.6 + (seed % 7) * 0.07
        axes = (150.0 * scale, 190.0 * scale)
        got = _spaced_points(np.random.default_rng(seed), count, (200.0, 250.0), axes)
        rng = np.random.default_rng(seed)
        r = np.sqrt(rng.uniform(0, 1, 3 * count))
        phi = rng.uniform(0, 2 * np.pi, 3 * count)
        x, y = 200.0 + axes[0] * r * np.cos(phi), 250.0 + axes[1] * r * np.sin(phi)
        dx, dy = x[:, None] - x[None, :], y[:, None] - y[None, :]
        close = np.triu(dx * dx + dy * dy < MIN_SPACING**2, 1)
        keep = ~close.any(axis=0)
        assert np.array_equal(got, np.column_stack([x, y])[keep][:count])


def test_impressions_differ_from_the_master_and_from_each_other_and_stay_in_the_image() -> None:
    rng = np.random.default_rng(3)
    for position in range(1, 11):
        master = master_finger(rng, position)
        a = impression(rng, master, quality=0.9)
        b = impression(rng, master, quality=0.4)
        for imp in (a, b):
            assert imp.count >= MIN_IMPRESSION_MINUTIAE
            assert imp.finger_position == position
            assert (imp.minutiae[:, 0] >= 0).all() and (imp.minutiae[:, 0] <= imp.width - 1).all()
            assert (imp.minutiae[:, 1] >= 0).all() and (imp.minutiae[:, 1] <= imp.height - 1).all()
            # No minutia is copied unchanged from the master: every one is moved and perturbed.
            d = np.hypot(*(imp.minutiae[:, None, :2] - master.minutiae[None, :, :2]).transpose(2, 0, 1))
            assert d.min() > 1e-3
        assert not same_template(a, b)


def test_a_good_impression_keeps_most_of_the_masters_minutiae() -> None:
    # Honest but matchable: losses and spurious additions stay within the documented rates.
    rng = np.random.default_rng(11)
    master = master_finger(rng, 2)
    imp = impression(rng, master, quality=1.0)
    assert 0.4 * master.count <= imp.count <= 1.2 * master.count


# --- population ---------------------------------------------------------------------------------


def test_every_overlap_category_and_charge_level_is_present(population: Population) -> None:
    truths = [b.truth for b in population.bookings]
    categories = {(t.iafis_subject_id is not None, t.ident_subject_id is not None) for t in truths}
    assert categories == {(True, True), (True, False), (False, True), (False, False)}
    charge_levels = {level_of(c.ncic_code) for b in population.bookings for c in b.booking.charges}
    assert charge_levels == {1, 2, 3}
    assert any(t.ident_status == rec.NATURALIZED_CITIZEN for t in truths)
    iafis_people = {e.person_id for e in population.iafis}
    ident_people = {e.person_id for e in population.ident}
    assert iafis_people & ident_people and iafis_people - ident_people and ident_people - iafis_people
    assert len(iafis_people | ident_people) < PERSONS  # some persons are in neither gallery


def test_ground_truth_is_consistent_with_the_galleries(population: Population) -> None:
    iafis = {e.subject_id: e for e in population.iafis}
    ident = {e.subject_id: e for e in population.ident}
    assert all(s.startswith("UCN-") for s in iafis) and all(s.startswith("FIN-") for s in ident)
    for b in population.bookings:
        t = b.truth
        assert t.tcn == b.booking.tcn
        levels = [level_of(c.ncic_code) for c in b.booking.charges]
        if t.iafis_subject_id is not None:
            entry = iafis[t.iafis_subject_id]
            assert entry.person_id == t.person_id
            assert isinstance(entry.record, rec.CriminalHistory)
            convicted = history_level(entry.record)
            levels += [convicted] if convicted is not None else []
        assert t.expected_level == min(levels)
        if t.ident_subject_id is not None:
            entry = ident[t.ident_subject_id]
            assert entry.person_id == t.person_id
            assert isinstance(entry.record, rec.ImmigrationHistory)
            assert t.ident_status == entry.record.status
            assert t.expect_notification == (entry.record.status != rec.NATURALIZED_CITIZEN)
        else:
            assert t.ident_status is None and not t.expect_notification


def test_bookings_carry_fresh_iso_impressions_with_enough_fingers(population: Population) -> None:
    iafis_by_person = {e.person_id: e for e in population.iafis}
    for b in population.bookings:
        fingers = b.booking.tenprint.fingers
        assert [f.position for f in fingers] == list(range(1, 11))
        absent = [f for f in fingers if f.WhichOneof("data") == "absence"]
        assert all(f.absence == bio.UNABLE_TO_PRINT for f in absent)
        assert all(f.template.format == bio.ISO_19794_2_2005 for f in fingers if f.HasField("template"))
        probe = decode_tenprint(b.booking.tenprint).templates
        assert len(probe.fingers) >= MIN_BOOKING_FINGERS
        enrolled = iafis_by_person.get(b.truth.person_id)
        if enrolled is not None:
            for position, template in probe.fingers.items():
                assert not same_template(template, enrolled.tenprint.fingers[position])


def test_a_person_in_both_galleries_is_enrolled_from_different_impressions(population: Population) -> None:
    ident_by_person = {e.person_id: e for e in population.ident}
    both = [(e, ident_by_person[e.person_id]) for e in population.iafis if e.person_id in ident_by_person]
    assert both
    for a, b in both:
        assert not same_template(a.tenprint.fingers[1], b.tenprint.fingers[1])


def test_charges_use_the_catalogue(population: Population) -> None:
    catalogue = {o.code: o for o in OFFENSES}
    for b in population.bookings:
        assert b.booking.charges
        for c in b.booking.charges:
            assert catalogue[c.ncic_code].literal == c.literal
    assert {o.level for o in OFFENSES if o.code[:2] in ("09", "10", "11", "12", "13", "35")} == {1}
    assert {o.level for o in OFFENSES if o.code[:2] in ("20", "22", "23", "24", "25", "26", "28")} == {2}


def test_tenprint_proto_round_trip(population: Population) -> None:
    t = population.iafis[0].tenprint
    message = tenprint_to_proto(t, absent={})
    assert same_tenprint(decode_tenprint(message).templates, t)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_population(generate_population(seed=5, persons=12, bookings=6), a)
    write_population(generate_population(seed=5, persons=12, bookings=6), b)
    write_population(generate_population(seed=6, persons=12, bookings=6), c)
    assert files_of(a) == files_of(b)
    assert files_of(a) != files_of(c)
    assert files_of(a)["iafis/records.jsonl"] != files_of(c)["iafis/records.jsonl"]


def test_write_read_round_trip(population: Population, tmp_path: Path) -> None:
    write_population(population, tmp_path / "pop")
    back = read_population(tmp_path / "pop")
    assert (back.seed, back.persons) == (population.seed, population.persons)
    for mine, theirs in ((population.iafis, back.iafis), (population.ident, back.ident)):
        assert [e.subject_id for e in mine] == [e.subject_id for e in theirs]
        for x, y in zip(mine, theirs, strict=True):
            assert x.person_id == y.person_id
            assert x.record == y.record
            assert same_tenprint(x.tenprint, y.tenprint)
    assert [b.booking for b in back.bookings] == [b.booking for b in population.bookings]
    assert [b.truth for b in back.bookings] == [b.truth for b in population.bookings]
    write_population(back, tmp_path / "again")
    assert files_of(tmp_path / "pop") == files_of(tmp_path / "again")


def test_manifest_follows_the_data_set_layout(population: Population, tmp_path: Path) -> None:
    write_population(population, tmp_path)
    lines = (tmp_path / "ident" / "manifest.csv").read_text().splitlines()
    assert lines[0] == "path,subject_id,finger_position,impression,role"
    path, subject, position, _impression, role = lines[1].split(",")
    assert role == "gallery" and 1 <= int(position) <= 10 and subject.startswith("FIN-")
    assert (tmp_path / "ident" / path).read_bytes()[:4] == b"FMR\0"
