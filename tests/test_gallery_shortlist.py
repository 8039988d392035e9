"""The two search tiers of a gallery: exhaustive full MCC for small galleries, and the faiss
shortlist followed by full MCC on the shortlisted subjects from ``min_gallery`` subjects on."""

from __future__ import annotations

import pytest
import torch

from fedprint.tenprint import decode_tenprint
from nodes.gallery.config import ShortlistConfig
from nodes.gallery.gallery import Gallery
from synthetic.population import Population

# Floating-point kernels: CI runs these again with AVX2 and with no vector extensions.
pytestmark = pytest.mark.kernels

CPU = torch.device("cpu")


def gallery_of(population: Population, shortlist: ShortlistConfig) -> Gallery:
    gallery = Gallery(CPU, shortlist=shortlist)
    entries = population.iafis
    gallery.add([e.subject_id for e in entries], gallery.encode([e.tenprint for e in entries]))
    return gallery


@pytest.fixture(scope="module")
def mated(population: Population) -> tuple[list[str], Gallery, Gallery]:
    """Expected subject ids of the bookings of enrolled IAFIS subjects, with an exhaustive and a
    shortlisting gallery (shortlist of 5 subjects out of the whole IAFIS gallery)."""
    exhaustive = gallery_of(population, ShortlistConfig(enabled=False))
    shortlisting = gallery_of(population, ShortlistConfig(min_gallery=1, candidates=5))
    expected = [b.truth.iafis_subject_id for b in population.bookings if b.truth.iafis_subject_id]
    assert len(expected) >= 5
    return expected, exhaustive, shortlisting


def test_a_large_gallery_scores_only_the_shortlist_and_finds_the_same_mates(
    population: Population, mated: tuple[list[str], Gallery, Gallery]
) -> None:
    expected, exhaustive, shortlisting = mated
    assert not exhaustive.uses_shortlist() and shortlisting.uses_shortlist()
    probes = exhaustive.encode(
        [
            decode_tenprint(b.booking.tenprint).templates
            for b in population.bookings
            if b.truth.iafis_subject_id
        ]
    )
    full = exhaustive.search(probes, k=3)
    short = shortlisting.search(probes, k=3)
    assert all(r.searched == len(population.iafis) and r.fully_scored == len(population.iafis) for r in full)
    assert all(r.searched == len(population.iafis) and r.fully_scored == 5 for r in short)
    assert [r.matches[0].subject_id for r in full] == expected
    assert [r.matches[0].subject_id for r in short] == expected
    # The shortlisted mate gets exactly the finger scores full MCC gives it: the tiers differ
    # only in which subjects are scored, never in how. The fused score may differ by the
    # search-time normalisation, which only ever lowers a score and needs a cohort of 20
    # candidates (5 here are too few; the exhaustive search of the whole gallery has one).
    for f, s in zip(full, short, strict=True):
        assert s.matches[0].finger_scores == pytest.approx(f.matches[0].finger_scores, abs=1e-6)
        assert s.matches[0].fused >= f.matches[0].fused - 1e-5
        assert s.matches[0].candidate_minutiae == f.matches[0].candidate_minutiae


def test_the_shortlist_follows_enrolment_and_removal(population: Population) -> None:
    gallery = gallery_of(population, ShortlistConfig(min_gallery=1, candidates=4))
    booking = next(b for b in population.bookings if b.truth.iafis_subject_id)
    probe = gallery.encode([decode_tenprint(booking.booking.tenprint).templates])
    mate = booking.truth.iafis_subject_id
    assert gallery.search(probe, k=1)[0].matches[0].subject_id == mate
    gallery.remove([mate])
    after = gallery.search(probe, k=4)[0]
    assert after.searched == len(population.iafis) - 1
    assert mate not in {m.subject_id for m in after.matches}


def test_a_subset_search_is_exhaustive_over_the_subset(
    population: Population, mated: tuple[list[str], Gallery, Gallery]
) -> None:
    expected, _, shortlisting = mated
    booking = next(b for b in population.bookings if b.truth.iafis_subject_id == expected[0])
    probe = shortlisting.encode([decode_tenprint(booking.booking.tenprint).templates])
    subset = [expected[0], *(e.subject_id for e in population.iafis[:7] if e.subject_id != expected[0])]
    result = shortlisting.search(probe, k=10, subset=subset)[0]
    assert result.searched == result.fully_scored == len(subset)
    assert result.matches[0].subject_id == expected[0]
