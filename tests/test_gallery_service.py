"""The gallery service of one node, over a real loopback server: subsets, limits,
calibrated FPIR targets, unusable fingers, removal."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from pydantic import SecretStr

from calibration.thresholds import Thresholds, calibrated_thresholds
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.clients import enroll
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import field_violations, open_channel
from fedprint.tenprint import tenprint_to_proto
from launcher.services import build_node
from nodes.gallery import GalleryNode
from nodes.gallery.config import NodeConfig
from nodes.gallery.requests import IdentifyPlan, rank_candidates
from synthetic.population import GalleryEntry, Population


@pytest_asyncio.fixture
async def ident(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles], database_url: str
) -> AsyncIterator[GalleryNode]:
    """The IDENT node on its store in SQLite, and again in PostgreSQL."""
    thresholds = Thresholds(hit=0.022, review=0.019, fpir_curve=[(1e-3, 0.022), (1e-4, 0.025)])
    node = build_node(
        NodeConfig(
            node="ident",
            data_dir=tmp_path,
            thresholds=thresholds,
            tls=pki["ident"],
            database_url=SecretStr(database_url),
        )
    )
    await node.host.start()
    await enroll(node.host.address, population.ident, tls=pki["admin"])
    try:
        yield node
    finally:
        await node.stop(0)


def probe_of(population: Population, subject_index: int) -> gal.Probe:
    """A fresh booking impression of an enrolled IDENT subject."""
    entry = population.ident[subject_index]
    booking = next(b for b in population.bookings if b.truth.ident_subject_id == entry.subject_id)
    return gal.Probe(probe_id="P-1", tenprint=booking.booking.tenprint)


def mated_index(population: Population) -> int:
    booked = {b.truth.ident_subject_id for b in population.bookings}
    return next(i for i, e in enumerate(population.ident) if e.subject_id in booked)


async def identify(
    node: GalleryNode, pki: dict[str, TlsFiles], request: gal.IdentifyRequest
) -> gal.IdentifyResponse:
    """Searches as the coordinator, the one role a node answers Identify for."""
    async with open_channel(node.host.address, pki["coordinator"], retries=False) as channel:
        return await gal_grpc.GalleryServiceStub(channel).Identify(request, timeout=30)


async def test_candidates_carry_per_finger_scores_and_thresholds(
    ident: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    i = mated_index(population)
    response = await identify(
        ident, pki, gal.IdentifyRequest(probes=[probe_of(population, i)], max_results=3)
    )
    result = response.results[0]
    assert response.node == "ident" and result.decision == bio.HIT
    assert [c.rank for c in result.candidates] == [1, 2, 3]
    assert result.candidates[0].subject_id == population.ident[i].subject_id
    assert result.candidates[0].immigration_history.subject_id == population.ident[i].subject_id
    # Minimal disclosure: only HIT candidates come with their record.
    for candidate in result.candidates[1:]:
        assert candidate.band == bio.HIT or candidate.WhichOneof("record") is None
    assert all(s.probe_minutiae > 0 and s.candidate_minutiae > 0 for s in result.candidates[0].finger_scores)
    assert result.thresholds.hit == pytest.approx(0.022) and result.searched_subjects == len(population.ident)
    # A gallery this small is below the shortlist tier: every subject gets full MCC.
    assert result.fully_scored_subjects == len(population.ident)


async def test_a_gallery_subset_limits_the_search(
    ident: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    i = mated_index(population)
    others = [e.subject_id for j, e in enumerate(population.ident) if j != i][:5]
    response = await identify(
        ident,
        pki,
        gal.IdentifyRequest(probes=[probe_of(population, i)], subject_ids=[*others, "FIN-UNKNOWN"]),
    )
    result = response.results[0]
    assert result.searched_subjects == result.fully_scored_subjects == 5
    assert {c.subject_id for c in result.candidates} <= set(others)
    assert result.decision == bio.NO_HIT


async def test_a_target_fpir_moves_the_hit_threshold(
    ident: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    request = gal.IdentifyRequest(probes=[probe_of(population, mated_index(population))], target_fpir=1e-4)
    result = (await identify(ident, pki, request)).results[0]
    assert result.thresholds.hit == pytest.approx(0.025) and result.thresholds.hit_fpir == pytest.approx(1e-4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identify(ident, pki, gal.IdentifyRequest(probes=request.probes, target_fpir=1e-7))
    assert [v.field for v in field_violations(caught.value)] == ["target_fpir"]


async def test_oversize_and_malformed_requests_name_their_fields(
    ident: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    probe = probe_of(population, mated_index(population))
    too_many = gal.IdentifyRequest(
        probes=[gal.Probe(probe_id=f"P-{k}", tenprint=probe.tenprint) for k in range(65)]
    )
    cases = {
        "probes": too_many,
        "max_results": gal.IdentifyRequest(probes=[probe], max_results=1000),
        "probes[1].probe_id": gal.IdentifyRequest(probes=[probe, probe]),
        "probes[0].tenprint.fingers[1].position": gal.IdentifyRequest(  # repeated position
            probes=[
                gal.Probe(
                    probe_id="P", tenprint=bio.TenPrint(fingers=[bio.Finger(position=bio.RIGHT_THUMB)] * 2)
                )
            ]
        ),
    }
    for field, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identify(ident, pki, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [v.field for v in field_violations(caught.value)], field


async def test_missing_and_unusable_fingers_are_reported_not_fatal(
    ident: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    entry = population.ident[0]
    fingers = dict(entry.tenprint.fingers)
    tenprint = tenprint_to_proto(type(entry.tenprint)({p: t for p, t in fingers.items() if p <= 6}))
    tenprint.fingers.add(position=bio.LEFT_INDEX, absence=bio.AMPUTATED)
    result = (
        await identify(ident, pki, gal.IdentifyRequest(probes=[gal.Probe(probe_id="P", tenprint=tenprint)]))
    ).results[0]
    issues = {(int(i.position), i.absence) for i in result.unusable_fingers}
    assert issues == {
        (7, bio.AMPUTATED),
        (8, bio.NOT_SUBMITTED),
        (9, bio.NOT_SUBMITTED),
        (10, bio.NOT_SUBMITTED),
    }
    assert result.candidates[0].subject_id == entry.subject_id  # its own enrollment impression


async def test_removed_subjects_are_no_longer_found(
    ident: GalleryNode, population: Population, pki: dict[str, TlsFiles]
) -> None:
    i = mated_index(population)
    async with open_channel(ident.host.address, pki["admin"]) as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        removed = await stub.Remove(
            gal.RemoveRequest(subject_ids=[population.ident[i].subject_id]), timeout=5
        )
        stats = await stub.GetStats(gal.GetStatsRequest(), timeout=5)
    assert removed.removed == 1 and stats.gallery_size == len(population.ident) - 1
    assert stats.template_format_version >= 1 and stats.device == "cpu"
    result = (await identify(ident, pki, gal.IdentifyRequest(probes=[probe_of(population, i)]))).results[0]
    assert population.ident[i].subject_id not in {c.subject_id for c in result.candidates}
    assert result.decision == bio.NO_HIT


async def test_the_hit_threshold_a_node_reports_rises_when_its_gallery_grows_tenfold(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    # The shipped calibration: a tail model, so the node derives its thresholds for its size.
    node = build_node(NodeConfig(node="iafis", data_dir=tmp_path, tls=pki["iafis"]))
    await node.host.start()
    try:
        async with open_channel(node.host.address, pki["admin"]) as channel:
            stub = gal_grpc.GalleryServiceStub(channel)
            await enroll(node.host.address, population.iafis[:3], tls=pki["admin"])
            small = (await stub.GetStats(gal.GetStatsRequest(), timeout=5)).thresholds
            await enroll(node.host.address, population.iafis[3:30], tls=pki["admin"])
            large = (await stub.GetStats(gal.GetStatsRequest(), timeout=5)).thresholds
    finally:
        await node.stop(0)
    assert (small.gallery_size, large.gallery_size) == (3, 30)
    assert large.hit > small.hit and large.review > small.review
    # The rates stay what the calibration promises: the thresholds moved to keep them.
    assert large.hit_fpir == small.hit_fpir == calibrated_thresholds().hit_fpir


def test_the_best_evidence_decides_whatever_the_fingers_each_candidate_was_compared_on() -> None:
    # With the shipped calibration at 28 subjects: a subject enrolled with three fingers scores a
    # higher fused LLR than a ten-finger candidate, yet stays NO_HIT by its own (higher)
    # thresholds, while the ten-finger one is in the review band. Ranked by raw fused score the
    # three-finger subject came first and the node answered NO_HIT.
    plan = IdentifyPlan([], calibrated_thresholds(), None, k=10)
    size = 28
    ten, three = plan.thresholds(size, 10), plan.thresholds(size, 3)
    review_ten = ten.review + 0.5 * (ten.hit - ten.review)
    assert three.review > review_ten  # fewer fingers need more evidence
    few = gal.Candidate(subject_id="UCN-FEW", fused_score=min(three.review - 0.1, review_ten + 5.0))
    for position in (1, 2, 3):
        few.finger_scores.add(position=bio.FingerPosition.ValueType(position), score=0.6, llr=0.5)
    full = gal.Candidate(subject_id="UCN-FULL", fused_score=review_ten)
    for position in range(1, 11):
        full.finger_scores.add(
            position=bio.FingerPosition.ValueType(position), score=0.3, llr=review_ten / 10
        )
    assert few.fused_score > full.fused_score
    for candidate in (few, full):
        plan.judge(candidate, size)
    assert (few.band, full.band) == (bio.NO_HIT, bio.REVIEW)
    result = gal.ProbeResult(probe_id="P-1")
    rank_candidates(result, [few, full], plan.k)
    assert result.decision == bio.REVIEW and result.decided_by == "UCN-FULL"
    assert [(c.subject_id, c.rank) for c in result.candidates] == [("UCN-FULL", 1), ("UCN-FEW", 2)]
    assert result.candidates[0].hit_margin == pytest.approx(review_ten - ten.hit)


def chimera(subject_id: str, fingers: dict[int, GalleryEntry], record_of: GalleryEntry) -> GalleryEntry:
    """A subject enrolled with ``fingers`` (position: whose enrolled finger), under its own id."""
    record = rec.ImmigrationHistory()
    record.CopyFrom(record_of.record)
    record.subject_id = subject_id
    tenprint = dataclasses.replace(
        record_of.tenprint, fingers={p: entry.tenprint.fingers[p] for p, entry in fingers.items()}
    )
    return dataclasses.replace(
        record_of, subject_id=subject_id, person_id="chimera", record=record, tenprint=tenprint
    )


async def test_a_node_decides_by_its_best_evidence_not_its_highest_raw_score(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    """Through a real node with the shipped calibration: the person booked is enrolled only in
    pieces. UCN-FULL holds two of their fingers among others' (ten enrolled), UCN-FEW one among
    three others' (four enrolled). UCN-FEW's fused LLR is the higher, but four fingers need far
    more evidence than ten: it is NO_HIT by its own thresholds while UCN-FULL is in the review
    band. Ranked by raw fused score, UCN-FEW came first and the node answered NO_HIT."""
    person = population.ident[mated_index(population)]
    others = [e for e in population.ident if e.subject_id != person.subject_id]
    full = chimera(
        "FIN-FULL", {p: person if p in (1, 2) else others[(p - 1) % 9] for p in range(1, 11)}, person
    )
    few = chimera("FIN-FEW", {3: person, 4: others[10], 5: others[11], 6: others[9]}, person)
    node = build_node(NodeConfig(node="ident", data_dir=tmp_path, tls=pki["ident"]))
    await node.host.start()
    try:
        await enroll(node.host.address, [*others, full, few], tls=pki["admin"])
        result = (
            await identify(
                node, pki, gal.IdentifyRequest(probes=[probe_of(population, mated_index(population))])
            )
        ).results[0]
    finally:
        await node.stop(0)
    by_id = {c.subject_id: c for c in result.candidates}
    assert by_id["FIN-FEW"].fused_score > by_id["FIN-FULL"].fused_score  # the raw order
    assert (by_id["FIN-FEW"].band, by_id["FIN-FULL"].band) == (bio.NO_HIT, bio.REVIEW)
    assert result.decision == bio.REVIEW and result.decided_by == "FIN-FULL"
    assert result.candidates[0].subject_id == "FIN-FULL" and result.candidates[0].rank == 1
