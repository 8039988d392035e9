"""Sharded gallery nodes, end to end over real gRPC servers: a router in front of shards that hold
one partition each of the node's store. The federation decides as it does unsharded; a shard that
does not answer makes the affected decisions INCOMPLETE, naming the shard, never a no-hit."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import grpc
import pytest

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.clients import Submission, enroll, submit_bookings
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import TlsFiles, agency_name
from fedprint.rpc import field_violations, open_channel
from launcher.services import build_node, build_router
from nodes.gallery.config import NodeConfig
from nodes.gallery.partition import Partition, by_owner, owner, subject_bucket
from synthetic.population import Population
from tests.conftest import Federation
from tests.sharding import ShardedFederation, shard_config, sharded_federation
from tests.test_federation_e2e import pick
from tests.waiting import eventually_awaited

DENIED = grpc.StatusCode.PERMISSION_DENIED


def test_a_subject_belongs_to_one_partition_by_a_stable_hash() -> None:
    # Fixed values: every process (and every release) must compute the same owner.
    assert subject_bucket("UCN-000001") == subject_bucket("UCN-000001") < 2**31
    assert [owner(f"UCN-{i:06d}", 3) for i in range(8)] == [
        subject_bucket(f"UCN-{i:06d}") % 3 for i in range(8)
    ]
    ids = [f"S-{i}" for i in range(300)]
    groups = by_owner(ids, 3)
    assert sorted(s for g in groups.values() for s in g) == sorted(ids)
    assert all(Partition(i, 3).owns(s) for i, g in groups.items() for s in g)
    assert all(60 < len(g) < 140 for g in groups.values())  # spread, roughly evenly
    with pytest.raises(ValueError):
        Partition(3, 3)


def kept_decisions(
    fed: Federation | ShardedFederation, population: Population, results: list[Submission]
) -> list[bk.BookingDecision]:
    """The population's decisions as the coordinator keeps them (what an agency sees leaves IDENT
    out), by TCN; ``results`` are the agencies' answers, one each."""
    for r in results:
        assert r.decision is not None, r.error
    return [fed.kept(b.booking) for b in sorted(population.bookings, key=lambda b: b.booking.tcn)]


def tenprint_decisions(decisions: list[bk.BookingDecision]) -> list[tuple[object, ...]]:
    """What a decision says, by TCN: status, each node's band and top candidate, level, and the
    notification state. (The candidates below the top may rank otherwise: the search-time
    normalisation of a probe finger that scores high against every candidate uses the
    candidates one shard holds, and this test's shards hold too few for it.)"""
    out = []
    for d in decisions:
        out.append(
            (
                d.tcn,
                bk.DecisionStatus.Name(d.status),
                bio.DecisionBand.Name(d.iafis.band),
                bio.DecisionBand.Name(d.ident.band),
                [c.subject_id for c in d.iafis.candidates[:1]],
                [c.subject_id for c in d.ident.candidates[:1]],
                d.level,
                # Queued or already delivered, as the outbox's timing has it: referred to ICE.
                bk.NotificationState.Name(bk.QUEUED if d.notification == bk.DELIVERED else d.notification),
            )
        )
    return out


def scores(decisions: list[bk.BookingDecision]) -> list[float]:
    """The fused score of each node's top candidate where it is a hit or goes to review (a
    no-hit's may differ where a probe finger scores high against the whole gallery: see
    :func:`tenprint_decisions`)."""
    return [
        c.fused_score
        for d in decisions
        for node in (d.iafis, d.ident)
        for c in node.candidates[:1]
        if c.band != bio.NO_HIT
    ]


async def decide_all(address: str, population: Population, pki: dict[str, TlsFiles]) -> list[Submission]:
    agencies = {b.booking.ori: pki[agency_name(b.booking.ori)] for b in population.bookings}
    return await submit_bookings(
        address, [b.booking for b in population.bookings], concurrency=6, agencies=agencies, deadline_s=120
    )


async def test_three_shards_and_one_decide_every_booking_as_an_unsharded_node_does(
    federation: Federation, population: Population, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    unsharded = kept_decisions(federation, population, await decide_all(federation.address, population, pki))
    await federation.coordinator.stop(0)  # its nodes stay up; only one federation decides at a time
    expected = tenprint_decisions(unsharded)
    assert all(status == "COMPLETE" for _, status, *_ in expected)
    assert any(iafis == "HIT" for _, _, iafis, *_ in expected) and any(
        i == "HIT" for *_, i, _, _, _, _ in expected
    )
    for shards in (1, 3):
        # What is compared is the decisions, not the speed: on a busy machine three shards and a
        # router in one process take their time, and a shard past the deadline would make the
        # decision incomplete (which other tests here check on purpose).
        async with sharded_federation(
            tmp_path / f"s{shards}", population, pki, shards, node_deadline_s=60.0
        ) as sharded:
            # Every shard holds its own partition, and together exactly the node's gallery.
            for node, enrolled in ((sharded.iafis, population.iafis), (sharded.ident, population.ident)):
                sizes = [len(s.servicer.gallery) for s in node.shards]
                assert sum(sizes) == len(enrolled) and (shards == 1 or all(sizes))
                for i, shard in enumerate(node.shards):
                    held, _ = shard.servicer.gallery.contents()
                    assert all(owner(s, shards) == i for s in held)
            results = kept_decisions(sharded, population, await decide_all(sharded.address, population, pki))
        assert tenprint_decisions(results) == expected, f"{shards} shards decide otherwise"
        assert all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
            for a, b in zip(scores(results), scores(unsharded), strict=True)
        )


async def test_a_stopped_shard_makes_the_decision_incomplete_naming_it_and_its_return_completes_it(
    population: Population, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    async with sharded_federation(tmp_path, population, pki, 3) as fed:
        stub = fed.booking_stub(sample.booking.ori)
        await fed.ident.shards[1].stop(0)
        decision = await stub.SubmitBooking(sample.booking, timeout=30)
        assert decision.status == bk.INCOMPLETE and decision.notification == bk.DEFERRED
        assert decision.ident.outcome == bk.PARTIAL and not decision.ident.candidates
        assert any("ident answered only in part" in reason for reason in decision.reasons)
        kept = fed.kept(sample.booking)
        assert kept.ident.band == bio.DECISION_BAND_UNSPECIFIED and not kept.ident.candidates  # not NO_HIT
        missing = fed.ident.shards[1].host.address
        assert f"shard 1 of 3 ({missing}) did not answer: UNAVAILABLE" in kept.ident.error
        assert any("ident answered only in part (shard 1 of 3" in reason for reason in kept.reasons)
        assert missing not in decision.ident.error + "".join(decision.reasons)  # no host to the agency
        assert decision.iafis.outcome == bk.ANSWERED

        # The shard comes back from the node's database; the coordinator's own retry completes it.
        await fed.ident.restart_shard(1)
        final = await eventually_awaited(
            lambda: stub.GetDecision(bk.GetDecisionRequest(tcn=sample.booking.tcn), timeout=5),
            lambda answer: answer.status == bk.COMPLETE,
            what="the coordinator's retry completing the booking",
        )
        assert final.attempt >= 2
        assert fed.kept(sample.booking).ident.candidates[0].subject_id == sample.truth.ident_subject_id
        assert final.notification in (bk.QUEUED, bk.DELIVERED)


async def test_the_router_answers_partially_when_a_shard_is_slow_and_fails_when_none_answers(
    population: Population, pki: dict[str, TlsFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with sharded_federation(tmp_path, population, pki, 2) as fed:
        probe = gal.Probe(probe_id="P-1", tenprint=population.bookings[0].booking.tenprint)
        node = gal_grpc.GalleryServiceStub(fed.channel(fed.iafis.address, "coordinator"))
        # Shard 0 cannot finish within the caller's deadline: its device queue is held up until
        # the answer is in.
        slow = fed.iafis.shards[0].servicer
        search, release = slow._search_batch, threading.Event()

        def stalled(items: list[object]) -> object:
            release.wait(timeout=120)
            return search(items)  # type: ignore[arg-type]

        monkeypatch.setattr(slow.batcher, "_run_batch", stalled)
        try:
            # An answer at all is the proof that the router kept within the caller's deadline.
            answer = await node.Identify(gal.IdentifyRequest(probes=[probe]), timeout=5)
        finally:
            release.set()
        (result,) = answer.results
        assert [m.partition.index for m in result.missing_shards] == [0]
        assert result.missing_shards[0].error.startswith("DEADLINE_EXCEEDED")
        assert result.searched_subjects == len(fed.iafis.shards[1].servicer.gallery)
        monkeypatch.undo()

        for shard in fed.iafis.shards:
            await shard.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.Identify(gal.IdentifyRequest(probes=[probe]), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no shard of the iafis node answered" in (caught.value.details() or "")


async def test_a_shard_on_another_partition_count_is_reported_not_merged(
    population: Population, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    """While the shard count changes, a shard still on the old count holds other subjects than
    its index says: the router names it missing rather than merge a wrong partition."""
    nodes = []
    try:
        for count, index in ((3, 0), (2, 1), (3, 2)):  # the middle one is still on 2 partitions
            node = build_node(shard_config("iafis", tmp_path, pki, count, index))
            await node.start()
            nodes.append(node)
        router = build_router(
            NodeConfig(
                node="iafis",
                role="router",
                shards=[n.host.address for n in nodes],
                data_dir=tmp_path / "router",
                tls=pki["iafis"],
            )
        )
        await router.start()
        nodes.append(router)  # type: ignore[arg-type]
        probe = gal.Probe(probe_id="P-1", tenprint=population.bookings[0].booking.tenprint)
        async with open_channel(router.host.address, pki["coordinator"], retries=False) as channel:
            answer = await gal_grpc.GalleryServiceStub(channel).Identify(
                gal.IdentifyRequest(probes=[probe]), timeout=10
            )
        (missing,) = answer.results[0].missing_shards
        assert (missing.partition.index, missing.partition.count) == (1, 3)
        assert missing.error == "answered for partition 1 of 2, not partition 1 of 3"
    finally:
        for node in reversed(nodes):
            await node.stop(0)


async def test_enrolments_go_to_their_owners_and_a_bad_stream_stores_nothing_anywhere(
    population: Population, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    async with sharded_federation(tmp_path, population, pki, 3) as fed:
        admin = gal_grpc.GalleryServiceStub(fed.channel(fed.iafis.address, "admin"))
        stats = await admin.GetStats(gal.GetStatsRequest(), timeout=10)
        assert stats.gallery_size == len(population.iafis) and not stats.HasField("partition")
        assert stats.finger_count == sum(s.servicer.gallery.finger_count for s in fed.iafis.shards)
        # Memory: the shards' bytes summed, and per subject over the node's subjects.
        held = [s.servicer.gallery.memory() for s in fed.iafis.shards]
        assert stats.host_bytes == sum(m.host_bytes for m in held) > 0
        assert stats.host_bytes_per_subject == pytest.approx(stats.host_bytes / stats.gallery_size)
        assert sum(m.bytes for m in stats.memory if m.part == "cylinders") == sum(
            p.bytes for m in held for p in m.parts if p.part == "cylinders"
        )

        good = population.iafis[0].enroll_request()
        good.subject_id = good.criminal_history.subject_id = "UCN-NEW-0001"
        bad = population.iafis[1].enroll_request()
        bad.subject_id = bad.criminal_history.subject_id = "UCN-NEW-0002"
        bad.tenprint.fingers[0].template.data = b"FMR\x00 21\x00" + bad.tenprint.fingers[0].template.data[8:]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.Enroll(iter([good, bad]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in field_violations(caught.value)] == [
            "requests[1].tenprint.fingers[0].template.data"
        ]
        assert sum(len(s.servicer.gallery) for s in fed.iafis.shards) == len(population.iafis)

        response = await admin.Enroll(iter([good]), timeout=30)
        assert (response.enrolled, response.gallery_size) == (1, len(population.iafis) + 1)
        home = owner("UCN-NEW-0001", 3)
        assert [("UCN-NEW-0001" in s.servicer.gallery.contents()[0]) for s in fed.iafis.shards] == [
            i == home for i in range(3)
        ]
        removed = await admin.Remove(
            gal.RemoveRequest(subject_ids=["UCN-NEW-0001", population.iafis[2].subject_id]), timeout=30
        )
        assert (removed.removed, removed.gallery_size) == (2, len(population.iafis) - 1)


async def test_shards_answer_their_own_nodes_router_only(
    population: Population, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    async with sharded_federation(tmp_path, population, pki, 2) as fed:
        probe = gal.Probe(probe_id="P-1", tenprint=population.bookings[0].booking.tenprint)
        shard = fed.iafis.shards[0].host.address
        # The coordinator must not get half a gallery's answer, nor IDENT's certificate IAFIS's.
        for identity in ("coordinator", "ident", "admin"):
            stub = gal_grpc.GalleryServiceStub(fed.channel(shard, identity))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Identify(gal.IdentifyRequest(probes=[probe]), timeout=10)
            assert caught.value.code() == DENIED
        admin = gal_grpc.GalleryServiceStub(fed.channel(shard, "admin"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.Remove(gal.RemoveRequest(subject_ids=[population.iafis[0].subject_id]), timeout=10)
        assert caught.value.code() == DENIED
        stats = await admin.GetStats(gal.GetStatsRequest(), timeout=10)  # administrators may look
        assert (stats.partition.index, stats.partition.count) == (0, 2)
        # The node's own certificate (the router's) is answered by its shards...
        own = gal_grpc.GalleryServiceStub(fed.channel(shard, "iafis"))
        answer = await own.Identify(gal.IdentifyRequest(probes=[probe]), timeout=30)
        assert (answer.partition.index, answer.partition.count) == (0, 2)
        # ...and refused by routers and whole nodes: gallery nodes call shards only.
        router = gal_grpc.GalleryServiceStub(fed.channel(fed.iafis.address, "iafis"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await router.Identify(gal.IdentifyRequest(probes=[probe]), timeout=10)
        assert caught.value.code() == DENIED
        other = gal_grpc.GalleryServiceStub(fed.channel(fed.iafis.address, "ident"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await other.GetStats(gal.GetStatsRequest(), timeout=10)
        assert caught.value.code() == DENIED


async def test_a_router_refuses_a_shard_that_judges_by_other_thresholds(
    population: Population, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    nodes = []
    try:
        config = shard_config("ident", tmp_path, pki, 1, 0)
        shard = build_node(
            # Another hit FPIR: the shard's thresholds follow another calibration than the router's.
            config.model_copy(update={"thresholds": config.thresholds.model_copy(update={"hit_fpir": 1e-5})})
        )
        await shard.start()
        nodes.append(shard)
        router = build_router(
            NodeConfig(
                node="ident",
                role="router",
                shards=[shard.host.address],
                data_dir=tmp_path / "r",
                tls=pki["ident"],
            )
        )
        await router.start()
        nodes.append(router)  # type: ignore[arg-type]
        await enroll(router.host.address, population.ident[:4], tls=pki["admin"])
        probe = gal.Probe(probe_id="P-1", tenprint=population.bookings[0].booking.tenprint)
        async with open_channel(router.host.address, pki["coordinator"], retries=False) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gal_grpc.GalleryServiceStub(channel).Identify(
                    gal.IdentifyRequest(probes=[probe]), timeout=10
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "judges by another calibration" in (caught.value.details() or "")
    finally:
        for node in reversed(nodes):
            await node.stop(0)
