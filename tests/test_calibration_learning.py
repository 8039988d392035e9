"""A node learns its thresholds from its own gallery, without labels (calibration.learning,
nodes.gallery.learner): impostor pairs of enrolled subjects, duplicates left out and reported,
moves bounded per update and around the prior, never when pinned or on too little evidence, and
every learned calibration as trustworthy as a fitted one at every finger count and gallery size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.learning import ImpostorSample, LearningPolicy, TrafficSample, adopt, learn_tails
from calibration.tails import CalibrationError
from calibration.thresholds import Thresholds, calibrated_thresholds
from fedprint.clients import enroll
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles
from fedprint.rpc import open_channel
from launcher.services import build_node
from nodes.gallery.config import NodeConfig
from nodes.gallery.gallery import Gallery, Match, SearchResult, resolve_device
from nodes.gallery.learner import CalibrationLearner
from nodes.gallery.store import GalleryStore
from nodes.iafis.records import CriminalHistoryStore
from synthetic.population import GalleryEntry, generate_population

PRIOR = calibrated_thresholds()


def impostor_llrs(rng: np.random.Generator, pairs: int, shift: float = 0.0) -> np.ndarray:
    """Per-finger LLRs of impostor pairs, ``[pairs, 10]``: mostly negative evidence with a long
    right tail, as an impostor finger's is; ``shift`` moves every finger's evidence (a
    deployment's prints scoring unlike the prior's). One finger in fifty not compared."""
    llr = rng.gumbel(-1.2 + shift, 0.55, size=(pairs, 10))
    llr[rng.random((pairs, 10)) < 0.02] = np.nan
    return llr


def sample_of(llr: np.ndarray, subjects: int, rng: np.random.Generator) -> ImpostorSample:
    names = [f"UCN-{i:05d}" for i in range(subjects)]
    who = np.random.default_rng(0)  # which subjects each pair is: apart from the finger draws
    first = who.integers(0, subjects, size=llr.shape[0])
    second = (first + 1 + who.integers(0, subjects - 1, size=llr.shape[0])) % subjects
    sample = ImpostorSample()
    sample.add(llr, first, second, names, PRIOR, rng)
    return sample


POLICY = LearningPolicy(min_subjects=100, min_pairs=20_000, max_step=4.0)


def learned(sample: ImpostorSample, current: Thresholds = PRIOR, size: int = 2000) -> Thresholds:
    return adopt(PRIOR, current, learn_tails(sample, POLICY), size, POLICY, "test").thresholds


def test_two_percent_duplicated_subjects_learn_the_thresholds_a_clean_gallery_learns() -> None:
    rng = np.random.default_rng(1)
    clean = impostor_llrs(rng, 40_000)
    # 2 % of 400 subjects enrolled twice: their pairs are the same person (strong evidence on
    # every finger), among the impostor pairs of everyone else.
    duplicates = rng.gumbel(4.0, 1.0, size=(8, 10))
    with_duplicates = np.concatenate([clean, duplicates])
    a = learned(sample_of(clean, 400, np.random.default_rng(2)))
    duplicated = sample_of(with_duplicates, 400, np.random.default_rng(2))
    b = learned(duplicated)
    assert len(duplicated.duplicates) == len(duplicates)  # each reported, none kept as an impostor
    for fingers in (1, 4, 10):
        for fpir in ("hit", "review"):
            clean_t = getattr(a.for_gallery(2000, fingers), fpir)
            dup_t = getattr(b.for_gallery(2000, fingers), fpir)
            assert abs(clean_t - dup_t) < 0.25, (fingers, fpir, clean_t, dup_t)


def test_a_threshold_moves_at_most_the_bound_per_update_and_stays_near_the_prior() -> None:
    # Prints whose impostors score far lower than the prior's (as another capture process's
    # can): the learned thresholds lie many steps below; each update takes one step.
    rng = np.random.default_rng(3)
    sample = sample_of(impostor_llrs(rng, 40_000, shift=-1.5), 400, rng)
    tails = learn_tails(sample, POLICY)
    current = PRIOR
    for _ in range(12):
        moved = adopt(PRIOR, current, tails, 2000, POLICY, "test").thresholds
        for fingers in range(1, 11):
            for fpir in ("hit", "review"):
                before = getattr(current.for_gallery(2000, fingers), fpir)
                after = getattr(moved.for_gallery(2000, fingers), fpir)
                assert after <= before + 1e-9 and before - after <= POLICY.max_step + 1e-6
                prior = getattr(PRIOR.for_gallery(2000, fingers), fpir)
                assert after >= prior - POLICY.max_below_prior - 1e-6
        current = moved
    # After enough updates the thresholds are the learned tails' own, where no bound holds them.
    settled = adopt(PRIOR, current, tails, 2000, POLICY, "test")
    assert max(abs(m) for m in settled.moves) < 1e-6


def test_a_sample_keeps_the_newest_pairs_up_to_its_bound() -> None:
    rng = np.random.default_rng(6)
    sample = ImpostorSample(max_pairs=25_000)
    names = [f"UCN-{i}" for i in range(100)]
    for _ in range(5):
        llr = impostor_llrs(rng, 10_000)
        pairs = np.arange(10_000) % 100
        sample.add(llr, pairs, (pairs + 1) % 100, names, PRIOR, rng)
    assert 25_000 <= sample.pairs(1) < 35_000  # the oldest batches were dropped, whole


def test_too_little_evidence_is_not_learned_from() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(CalibrationError, match="subjects are too few"):
        learn_tails(sample_of(impostor_llrs(rng, 40_000), 50, rng), POLICY)
    with pytest.raises(CalibrationError, match="impostor pairs on"):
        learn_tails(sample_of(impostor_llrs(rng, 5_000), 400, rng), POLICY)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(-2.0, 1.0), size=st.integers(10, 10**7))
def test_any_learned_calibration_is_monotone(seed: int, shift: float, size: int) -> None:
    # The same property the shipped calibration and any fitted one have (test_calibration_tail).
    rng = np.random.default_rng(seed)
    sample = sample_of(impostor_llrs(rng, 25_000, shift=shift), 300, rng)
    adopted = adopt(PRIOR, PRIOR, learn_tails(sample, POLICY), size, POLICY, "test").thresholds
    assert adopted.problems() == []


def test_searches_that_return_only_their_top_candidates_measure_the_impostor_tail() -> None:
    # Impostor scores exponential above 0 (r(t) = e^-t): each search of 2,000 subjects returns
    # its ten best; the traffic tail recovers r where no search returns every exceedance.
    rng = np.random.default_rng(5)
    traffic = TrafficSample(LearningPolicy(min_searches=500))
    for _ in range(800):
        scores = np.sort(rng.exponential(1.0, 2000))[::-1][:10]
        traffic.add(10, scores, kth=float(scores[-1]), searched=2000)
    tail = traffic.tail(10, below=PRIOR.tail(10))  # type: ignore[arg-type]
    for rate in (1e-4, 1e-5, 1e-6):
        t = -np.log(rate)
        assert rate / 2 < tail.rate(t) < rate * 2, (rate, tail.rate(t))
    with pytest.raises(CalibrationError, match="searches on 3 fingers are too few"):
        traffic.tail(3, below=PRIOR.tail(3))  # type: ignore[arg-type]


def test_a_best_candidate_far_above_the_rest_is_taken_for_the_mate(tmp_path: Path) -> None:
    """Traffic: a mate (hit or not) stands far apart from the impostors below it and is left
    out; the best of a search that holds only impostors is an impostor, and stays in."""
    store = GalleryStore(f"sqlite:///{tmp_path / 'g.sqlite'}", CriminalHistoryStore())
    learner = CalibrationLearner(
        Gallery(resolve_device("cpu")), store, PRIOR, LearningPolicy(from_traffic=True)
    )
    ten = {position: 0.1 for position in range(1, 11)}

    def search(*scores: float) -> SearchResult:
        return SearchResult([Match(f"UCN-{i}", s, ten, {}) for i, s in enumerate(scores)], 2000, 200)

    # A mate below any hit threshold, but far above the impostors; then a search of strangers.
    learner.observe([search(-1.0, -14.0, -15.0), search(-13.5, -14.0, -15.0)], [10, 10], k=3)
    kept = [sorted(scores.tolist()) for scores in learner.traffic.impostors(10)]
    assert kept == [[-15.0, -14.0], [-15.0, -14.0, -13.5]]
    store.close()


def enlarged(population_entries: list[GalleryEntry], copies: int) -> list[GalleryEntry]:
    """``population_entries`` plus ``copies`` of its first subjects enrolled again under new ids."""
    twins = []
    for entry in population_entries[:copies]:
        record = type(entry.record)()
        record.CopyFrom(entry.record)
        record.subject_id = f"{entry.subject_id}-TWIN"
        twins.append(GalleryEntry(record.subject_id, entry.person_id, entry.tenprint, record))
    return [*population_entries, *twins]


async def stats(address: str, pki: dict[str, TlsFiles]) -> gal.GalleryStats:
    async with open_channel(address, pki["admin"]) as channel:
        return await gal_grpc.GalleryServiceStub(channel).GetStats(gal.GetStatsRequest(), timeout=10)


async def test_a_node_learns_from_its_gallery_reports_its_duplicates_and_restarts_with_it(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    population = generate_population(seed=21, persons=150, bookings=1)
    entries = enlarged(population.iafis, 2)
    # A small policy, so that a small gallery is enough evidence here.
    policy = LearningPolicy(min_subjects=40, min_pairs=1000, probe_subjects=60, max_candidates=60)
    config = NodeConfig(node="iafis", data_dir=tmp_path, tls=pki["iafis"], learning=policy)
    node = build_node(config)
    await node.host.start()
    try:
        await enroll(node.host.address, entries, tls=pki["admin"])
        before = await stats(node.host.address, pki)
        assert before.thresholds.source == PRIOR.source
        done = node.servicer.learner.learn()
        assert done.adoption is not None, done.why_not
        after = await stats(node.host.address, pki)
        assert after.thresholds.source.startswith("learned from")
        duplicates = {frozenset((d.first, d.second)) for d in node.servicer.learner.sample.duplicates}
        twins = {frozenset((e.subject_id, f"{e.subject_id}-TWIN")) for e in population.iafis[:2]}
        assert twins <= duplicates  # each enrolled twice, reported, left out of the tails
        moved = [abs(m) for m in done.adoption.moves]
        assert max(moved) <= policy.max_step + 1e-6
    finally:
        await node.stop(0)
    # A restart judges by what was learned, read back from the store.
    again = build_node(config)
    await again.host.start()
    try:
        restarted = await stats(again.host.address, pki)
        assert restarted.thresholds.source == after.thresholds.source
        assert restarted.thresholds.hit == pytest.approx(after.thresholds.hit)
    finally:
        await again.stop(0)


async def test_a_pinned_calibration_and_a_small_gallery_never_move(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    population = generate_population(seed=22, persons=130, bookings=1)
    entries = population.iafis[:50]
    assert len(entries) == 50
    small = LearningPolicy(min_pairs=1000, probe_subjects=60, max_candidates=60)  # min_subjects 200
    pinned = small.model_copy(update={"pinned": True, "min_subjects": 40})
    for name, policy in (("small", small), ("pinned", pinned)):
        config = NodeConfig(node="iafis", data_dir=tmp_path / name, tls=pki["iafis"], learning=policy)
        node = build_node(config)
        await node.host.start()
        try:
            await enroll(node.host.address, entries, tls=pki["admin"])
            done = node.servicer.learner.learn()
            assert done.adoption is None and done.pairs == 0
            assert ("need 200" in done.why_not) if name == "small" else ("pinned" in done.why_not)
            kept = await stats(node.host.address, pki)
            assert kept.thresholds.source == PRIOR.source
            assert kept.thresholds.hit == pytest.approx(PRIOR.for_gallery(50).hit)
        finally:
            await node.stop(0)
