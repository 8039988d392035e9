"""End to end over real gRPC servers on loopback: booking -> IAFIS + IDENT at once ->
threat policy -> ICE notification, including the ways it can go wrong."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import field_violations
from synthetic.population import Population, SyntheticBooking
from tests.conftest import Federation, key
from tests.waiting import eventually, eventually_awaited


def pick(population: Population, *, iafis: bool, ident: bool, notify: bool | None = None) -> SyntheticBooking:
    for b in population.bookings:
        t = b.truth
        in_iafis, in_ident = t.iafis_subject_id is not None, t.ident_subject_id is not None
        if (in_iafis, in_ident) == (iafis, ident) and notify in (None, t.expect_notification):
            return b
    raise AssertionError("the population lacks a booking of this kind")


def with_tcn(booking: bk.Booking, tcn: str) -> bk.Booking:
    copy = bk.Booking()
    copy.CopyFrom(booking)
    copy.tcn = tcn
    return copy


async def test_iafis_only_match_returns_the_criminal_history_and_notifies_no_one(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=True, ident=False)
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.status == bk.COMPLETE
    assert decision.iafis.band == bio.HIT
    top = decision.iafis.candidates[0]
    assert top.subject_id == sample.truth.iafis_subject_id
    assert top.criminal_history.subject_id == sample.truth.iafis_subject_id
    assert len(top.finger_scores) >= 6 and top.fused_score >= decision.iafis.thresholds.hit
    assert decision.notification == bk.NOT_REQUIRED
    assert decision.level == sample.truth.expected_level
    assert decision.policy_version and decision.reasons
    # Of IDENT the agency learns only that it answered; the coordinator keeps its result.
    assert decision.ident.outcome == bk.ANSWERED and not decision.ident.candidates
    assert federation.kept(sample.booking).ident.band == bio.NO_HIT
    # The outbox is written with the decision, in one transaction: no row, no notice ever.
    assert federation.coordinator.coordinator.store.outbox_attempts(key(sample.booking)) is None
    assert await federation.notifications() == []


async def test_ident_match_with_a_level_1_charge_notifies_ice_at_level_1(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    booking = with_tcn(sample.booking, "TCN-ROBBERY-1")
    del booking.charges[:]
    booking.charges.add(ncic_code="1201", literal="ROBBERY - BUSINESS - GUN")
    decision = await federation.booking_stub(booking.ori).SubmitBooking(booking, timeout=30)
    assert decision.status == bk.COMPLETE
    assert decision.level == rec.LEVEL_1
    assert decision.notification == bk.QUEUED  # referred to ICE: all the agency learns of IDENT
    kept = federation.kept(booking)
    assert kept.ident.band == bio.HIT
    assert kept.ident.candidates[0].subject_id == sample.truth.ident_subject_id
    received = await federation.wait_for_notifications(1)
    assert len(received) == 1
    notification = received[0].notification
    assert (notification.tcn, notification.ori, notification.level) == (booking.tcn, booking.ori, rec.LEVEL_1)
    assert notification.ident_match.subject_id == sample.truth.ident_subject_id
    assert notification.ident_match.immigration_history.encounters
    assert notification.ident_match.fused_score >= notification.hit_threshold
    # Delivery is recorded on the stored decision, just after ICE acknowledges it.
    stub = federation.booking_stub(booking.ori)
    await eventually_awaited(
        lambda: stub.GetDecision(bk.GetDecisionRequest(tcn=booking.tcn), timeout=5),
        lambda stored: stored.notification == bk.DELIVERED,
        what="delivery recorded on the decision",
    )


async def test_a_subject_in_neither_gallery_is_a_no_hit_without_notification(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=False)
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.status == bk.COMPLETE
    assert decision.iafis.band == bio.NO_HIT
    assert federation.kept(sample.booking).ident.band == bio.NO_HIT
    assert decision.notification == bk.NOT_REQUIRED
    # Candidates still come with their scores and the thresholds they were compared against.
    assert (
        decision.iafis.candidates and decision.iafis.thresholds.hit > decision.iafis.candidates[0].fused_score
    )
    assert federation.coordinator.coordinator.store.outbox_attempts(key(sample.booking)) is None
    assert await federation.notifications() == []


async def test_a_stopped_node_makes_the_decision_incomplete_and_a_retry_completes_it(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    await federation.ident.stop(0)
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.status == bk.INCOMPLETE
    assert decision.ident.outcome == bk.UNAVAILABLE
    assert federation.kept(sample.booking).ident.band == bio.DECISION_BAND_UNSPECIFIED  # not NO_HIT
    assert decision.iafis.outcome == bk.ANSWERED
    assert decision.notification == bk.DEFERRED
    assert any("ident did not answer" in reason for reason in decision.reasons)
    assert await federation.notifications() == []

    # The node comes back from its own database; the booking system retries the same TCN.
    await federation.restart_node("ident")
    stub = federation.booking_stub(sample.booking.ori)
    # As a booking system does: resubmit an incomplete decision after a pause until it completes.
    retried = await eventually_awaited(
        lambda: stub.SubmitBooking(sample.booking, timeout=30),
        lambda answer: answer.status == bk.COMPLETE,
        what="the resubmitted booking completing",
    )
    assert retried.attempt >= 2
    assert federation.kept(sample.booking).ident.candidates[0].subject_id == sample.truth.ident_subject_id
    assert retried.notification == bk.QUEUED
    assert len(await federation.wait_for_notifications(1)) == 1


async def test_a_malformed_template_is_refused_with_field_details_and_nothing_is_stored(
    federation: Federation, population: Population
) -> None:
    booking = with_tcn(pick(population, iafis=True, ident=True).booking, "TCN-MALFORMED-1")
    finger = next(f for f in booking.tenprint.fingers if f.WhichOneof("data") == "template")
    finger.template.data = finger.template.data[:30]  # truncated record
    stub = federation.booking_stub(booking.ori)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitBooking(booking, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in field_violations(caught.value)]
    index = list(booking.tenprint.fingers).index(finger)
    assert fields == [f"tenprint.fingers[{index}].template.data"]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetDecision(bk.GetDecisionRequest(tcn=booking.tcn), timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert federation.coordinator.coordinator.store.audit(key(booking)) == []


async def test_a_malformed_enrollment_stores_nothing_of_its_stream(
    federation: Federation, population: Population
) -> None:

    good = population.iafis[0].enroll_request()
    good.subject_id = good.criminal_history.subject_id = "UCN-NEW-0001"
    bad = population.iafis[1].enroll_request()
    bad.subject_id = bad.criminal_history.subject_id = "UCN-NEW-0002"
    bad.tenprint.fingers[0].template.data = b"FMR\x00 21\x00" + bad.tenprint.fingers[0].template.data[8:]
    async with federation.channel(federation.iafis.host.address, "admin") as channel:
        stub = gal_grpc.GalleryServiceStub(channel)
        before = await stub.GetStats(gal.GetStatsRequest(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Enroll(iter([good, bad]), timeout=10)
        after = await stub.GetStats(gal.GetStatsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(caught.value)] == [
        "requests[1].tenprint.fingers[0].template.data"
    ]
    assert after.gallery_size == before.gallery_size
    assert federation.iafis.servicer.store.count() == before.gallery_size


async def test_resubmitting_a_tcn_returns_the_same_decision_and_notifies_once(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    stub = federation.booking_stub(sample.booking.ori)
    first, second = await asyncio.gather(
        stub.SubmitBooking(sample.booking, timeout=30), stub.SubmitBooking(sample.booking, timeout=30)
    )
    assert first.decided_at == second.decided_at and first.attempt == second.attempt == 1
    store = federation.coordinator.coordinator.store
    await eventually(
        lambda: store.outbox_attempts(key(sample.booking)),
        lambda seen: seen is not None and seen[1],
        what="the notice delivered",
    )
    assert len(await federation.notifications()) == 1


async def test_notifications_survive_an_ice_outage(federation: Federation, population: Population) -> None:
    sample = pick(population, iafis=False, ident=True, notify=True)
    await federation.ice.stop(0)
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.notification == bk.QUEUED
    store = federation.coordinator.coordinator.store
    attempts = await eventually(
        lambda: store.outbox_attempts(key(sample.booking)),
        lambda seen: seen is not None and seen[0] >= 1,
        what="a failed delivery attempt",
    )
    assert attempts is not None and not attempts[1]
    await federation.restart_ice()
    received = await federation.wait_for_notifications(1)
    assert [r.notification.tcn for r in received] == [sample.booking.tcn]


async def test_watchers_see_each_decision(federation: Federation, population: Population) -> None:
    sample = pick(population, iafis=True, ident=False)
    stub = federation.booking_stub(sample.booking.ori)
    stream = stub.WatchDecisions(bk.WatchDecisionsRequest(ori=sample.booking.ori))
    await stream.initial_metadata()  # sent once the watch is registered
    await stub.SubmitBooking(sample.booking, timeout=30)
    seen = await asyncio.wait_for(stream.read(), 10)
    assert isinstance(seen, bk.BookingDecision) and seen.tcn == sample.booking.tcn
    stream.cancel()


async def test_every_server_serves_health_and_reflection(federation: Federation) -> None:
    services = {
        federation.coordinator.host.address: "fedprint.booking.v1.BookingService",
        federation.iafis.host.address: "fedprint.gallery.v1.GalleryService",
        federation.ident.host.address: "fedprint.gallery.v1.GalleryService",
        federation.ice.host.address: "fedprint.ice.v1.IceNotificationService",
    }
    for address, service in services.items():
        async with federation.channel(address, "examiner") as channel:  # health answers any role
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            listed = [s.name async for r in reflection for s in r.list_services_response.service]
            assert service in listed and "grpc.health.v1.Health" in listed
