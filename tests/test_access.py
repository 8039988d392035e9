"""Only those allowed get in, and each sees only what it may: refusals by role and by ORI, each
audited with the caller's identity; every allowed role still gets in; rate limits per ORI; and
minimal disclosure in what nodes answer and what the coordinator returns and keeps."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from calibration.thresholds import Thresholds
from federation.coordinator import build_coordinator
from fedprint.access import ACCESS, retry_delay
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.clients import enroll
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.pki import DevCa, Role, TlsFiles, agency_name
from fedprint.rpc import open_channel
from fedprint.settings import RateLimit
from launcher.services import build_node
from nodes.gallery.config import NodeConfig
from synthetic.population import Population
from tests.conftest import Federation, key
from tests.test_federation_e2e import pick, with_tcn

DENIED = grpc.StatusCode.PERMISSION_DENIED


Denials = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def denials() -> Iterator[Denials]:
    """The ``access denied`` log entries written so far in the test."""
    with capture_logs() as logs:
        yield lambda: [e for e in logs if e["event"] == "access denied"]


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def other_ori(population: Population, ori: str) -> str:
    return next(b.booking.ori for b in population.bookings if b.booking.ori != ori)


def test_every_rpc_of_every_service_is_in_the_role_table() -> None:
    from fedprint.booking.v1 import booking_pb2
    from fedprint.gallery.v1 import gallery_pb2

    methods = {
        f"/{service.full_name}/{method.name}"
        for descriptor in (booking_pb2.DESCRIPTOR, gallery_pb2.DESCRIPTOR, ice.DESCRIPTOR)
        for service in descriptor.services_by_name.values()
        for method in service.methods
    }
    assert methods <= set(ACCESS)
    # The coordinator searches; gallery-node is a sharded node's router calling its own shards
    # (tests/test_sharding.py: a shard admits its own node's certificate only, nodes refuse it).
    assert ACCESS["/fedprint.gallery.v1.GalleryService/Identify"] == {Role.COORDINATOR, Role.GALLERY_NODE}
    assert not any(Role.BOOKING_AGENCY in ACCESS[m] for m in methods if "GalleryService" in m)
    assert ACCESS["/fedprint.ice.v1.IceNotificationService/ListNotifications"] == {Role.ICE}


async def test_a_booking_agency_may_call_nothing_but_the_booking_service(
    federation: Federation, population: Population, denials: Denials
) -> None:
    ori = population.bookings[0].booking.ori
    agency = agency_name(ori)
    probe = gal.Probe(probe_id="P-1", tenprint=population.bookings[0].booking.tenprint)
    async with federation.channel(federation.iafis.host.address, agency) as channel:
        node = gal_grpc.GalleryServiceStub(channel)
        for call in (
            node.Identify(gal.IdentifyRequest(probes=[probe]), timeout=5),
            node.Enroll(iter([population.iafis[0].enroll_request()]), timeout=5),
            node.Remove(gal.RemoveRequest(subject_ids=[population.iafis[0].subject_id]), timeout=5),
            node.GetStats(gal.GetStatsRequest(), timeout=5),
        ):
            assert (await refused(call)).code() == DENIED
    async with federation.channel(federation.ice.host.address, agency) as channel:
        queue = ice_grpc.IceNotificationServiceStub(channel)
        notify = queue.Notify(ice.Notification(tcn="TCN-FORGED-1", ori=ori, level=1), timeout=5)
        assert (await refused(notify)).code() == DENIED
        listing = queue.ListNotifications(ice.ListNotificationsRequest(), timeout=5)
        assert (await refused(listing)).code() == DENIED
    methods = sorted(d["method"].rsplit("/", 1)[1] for d in denials())
    assert methods == sorted(["Identify", "Enroll", "Remove", "GetStats", "Notify", "ListNotifications"])
    for denial in denials():  # audited with the caller's identity
        assert denial["subject"] == f"CN={agency},O=fedprint development"
        assert (denial["role"], denial["ori"]) == ("booking-agency", ori)
        assert denial["peer"].startswith("ipv4:127.0.0.1:") and denial["audit"] is True
    # Nothing of the refused calls happened.
    assert federation.iafis.servicer.store.count() == len(population.iafis)


async def test_only_the_gallery_administrator_enrolls_and_only_the_coordinator_searches(
    federation: Federation, population: Population, denials: Denials
) -> None:
    probe = gal.Probe(probe_id="P-1", tenprint=population.bookings[0].booking.tenprint)
    for identity in ("admin", "examiner", "ice", "ident"):
        async with federation.channel(federation.iafis.host.address, identity) as channel:
            call = gal_grpc.GalleryServiceStub(channel).Identify(
                gal.IdentifyRequest(probes=[probe]), timeout=5
            )
            assert (await refused(call)).code() == DENIED
    for identity in ("coordinator", "examiner", "ice"):
        async with federation.channel(federation.iafis.host.address, identity) as channel:
            call = gal_grpc.GalleryServiceStub(channel).Remove(
                gal.RemoveRequest(subject_ids=["UCN-X"]), timeout=5
            )
            assert (await refused(call)).code() == DENIED
    for identity in ("admin", "coordinator", "examiner"):
        async with federation.channel(federation.ice.host.address, identity) as channel:
            call = ice_grpc.IceNotificationServiceStub(channel).ListNotifications(
                ice.ListNotificationsRequest(), timeout=5
            )
            assert (await refused(call)).code() == DENIED
    assert [d["role"] for d in denials()] == [
        *["gallery-admin", "examiner", "ice", "gallery-node"],
        *["coordinator", "examiner", "ice"],
        *["gallery-admin", "coordinator", "examiner"],
    ]
    # Each allowed role still gets in.
    async with federation.channel(federation.iafis.host.address, "coordinator") as channel:
        found = await gal_grpc.GalleryServiceStub(channel).Identify(
            gal.IdentifyRequest(probes=[probe]), timeout=30
        )
        assert found.results[0].candidates
    async with federation.channel(federation.iafis.host.address, "admin") as channel:
        stats = await gal_grpc.GalleryServiceStub(channel).GetStats(gal.GetStatsRequest(), timeout=5)
        assert stats.gallery_size == len(population.iafis)
    assert await federation.notifications() == []  # as ICE
    for identity in ("examiner", "coordinator", "admin", "ice"):  # health answers every role
        async with federation.channel(federation.coordinator.host.address, identity) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_booking_claiming_another_agencys_ori_is_refused_before_its_prints_are_read(
    federation: Federation, population: Population, denials: Denials
) -> None:
    booking = with_tcn(population.bookings[0].booking, "TCN-FORGED-ORI-1")
    mine = other_ori(population, booking.ori)
    del booking.tenprint.fingers[:]  # would be INVALID_ARGUMENT, were it read
    error = await refused(federation.booking_stub(mine).SubmitBooking(booking, timeout=10))
    assert error.code() == DENIED and f"certificate is for ORI {mine}" in (error.details() or "")
    assert [(d["ori"], d["tcn"]) for d in denials()] == [(mine, booking.tcn)]
    store = federation.coordinator.coordinator.store
    # Audited under the TCN the refused request named (no booking of that ORI and TCN exists).
    [(event, detail)] = store.audit(booking.tcn)
    assert (
        event == "access_denied"
        and f"subject=CN={agency_name(mine)}" in detail
        and "role=booking-agency" in detail
    )
    assert store.decision(key(booking)) is None


async def test_an_agency_outside_the_allow_list_is_refused(
    federation: Federation, population: Population, pki: dict[str, TlsFiles]
) -> None:
    stranger = DevCa.load(pki["admin"].ca.parent).issue(
        "agency-ZZ9999999", Role.BOOKING_AGENCY, ori="ZZ9999999"
    )
    booking = with_tcn(population.bookings[0].booking, "TCN-STRANGER-1")
    booking.ori = "ZZ9999999"
    async with open_channel(federation.address, stranger) as channel:
        error = await refused(bk_grpc.BookingServiceStub(channel).SubmitBooking(booking, timeout=10))
    assert error.code() == DENIED and "not authorised" in (error.details() or "")
    assert federation.coordinator.coordinator.store.audit(booking.tcn)[0][0] == "access_denied"


async def test_an_agency_reads_and_watches_only_its_own_decisions(
    federation: Federation, population: Population, denials: Denials
) -> None:
    sample = pick(population, iafis=True, ident=False)
    owner = federation.booking_stub(sample.booking.ori)
    await owner.SubmitBooking(sample.booking, timeout=30)
    assert (await owner.GetDecision(bk.GetDecisionRequest(tcn=sample.booking.tcn), timeout=5)).tcn
    other = other_ori(population, sample.booking.ori)
    nosy = federation.booking_stub(other)
    # Its TCN is the owner's: to another agency it is a TCN nobody used (see test_booking_ownership).
    error = await refused(nosy.GetDecision(bk.GetDecisionRequest(tcn=sample.booking.tcn), timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    asked = bk.GetDecisionRequest(tcn=sample.booking.tcn, ori=sample.booking.ori)
    assert (await refused(nosy.GetDecision(asked, timeout=5))).code() == DENIED
    for ori in ("", sample.booking.ori):  # all decisions, and another agency's
        stream = nosy.WatchDecisions(bk.WatchDecisionsRequest(ori=ori), timeout=5)
        assert (await refused(stream.read())).code() == DENIED
    assert [(d["ori"], d["method"].rsplit("/", 1)[1]) for d in denials()] == [
        (other, "GetDecision"),
        (other, "WatchDecisions"),
        (other, "WatchDecisions"),
    ]
    events = [e for e, _ in federation.coordinator.coordinator.store.audit(key(sample.booking))]
    assert events == ["decision"]  # the refusals named an ORI, not this booking


async def test_each_agency_is_held_to_its_rate_limit_with_a_retry_delay(
    federation: Federation, population: Population
) -> None:
    config = federation.coordinator_config.model_copy(
        update={"rate_limit": RateLimit(per_second=0.5, burst=2), "data_dir": federation.root / "limited"}
    )
    limited = build_coordinator(config)
    await limited.start()
    try:
        ori = population.bookings[0].booking.ori
        async with open_channel(limited.host.address, federation.pki[agency_name(ori)]) as channel:
            stub = bk_grpc.BookingServiceStub(channel)
            for _ in range(2):  # the burst: answered (NOT_FOUND: nothing was booked here)
                error = await refused(stub.GetDecision(bk.GetDecisionRequest(tcn="TCN-NONE"), timeout=5))
                assert error.code() == grpc.StatusCode.NOT_FOUND
            error = await refused(stub.GetDecision(bk.GetDecisionRequest(tcn="TCN-NONE"), timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        delay = retry_delay(error)
        assert delay is not None and 0.0 < delay <= 2.0
        # Another agency has its own budget.
        other = other_ori(population, ori)
        async with open_channel(limited.host.address, federation.pki[agency_name(other)]) as channel:
            error = await refused(
                bk_grpc.BookingServiceStub(channel).GetDecision(
                    bk.GetDecisionRequest(tcn="TCN-NONE"), timeout=5
                )
            )
        assert error.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await limited.stop(0)


async def test_a_no_hit_booking_discloses_no_candidates_record(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=False, ident=False)
    stub = federation.booking_stub(sample.booking.ori)
    decision = await stub.SubmitBooking(sample.booking, timeout=30)
    stored = federation.kept(sample.booking)
    assert (decision.iafis.band, stored.ident.band) == (bio.NO_HIT, bio.NO_HIT)
    fetched = await stub.GetDecision(bk.GetDecisionRequest(tcn=sample.booking.tcn), timeout=5)
    assert stored.iafis.candidates and stored.ident.candidates  # the coordinator keeps the scores
    for kept in (decision, stored, fetched):
        assert kept.iafis.candidates  # an agency sees its IAFIS candidates' scores, no IDENT ones
        for candidate in [*kept.iafis.candidates, *kept.ident.candidates]:
            assert candidate.WhichOneof("record") is None, candidate.subject_id
    assert not decision.ident.candidates and not fetched.ident.candidates


async def test_the_agency_never_gets_an_immigration_record_ice_does(
    federation: Federation, population: Population
) -> None:
    sample = pick(population, iafis=True, ident=True, notify=True)
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    assert decision.notification == bk.QUEUED  # referred to ICE
    assert not decision.ident.candidates and decision.ident.band == bio.DECISION_BAND_UNSPECIFIED
    # The criminal history of the IAFIS hit is the agency's; no other candidate's record is.
    assert decision.iafis.candidates[0].criminal_history.subject_id == sample.truth.iafis_subject_id
    assert all(c.WhichOneof("record") is None for c in decision.iafis.candidates if c.band != bio.HIT)
    stored = federation.kept(sample.booking)
    assert stored.ident.band == bio.HIT
    assert all(c.WhichOneof("record") is None for c in stored.ident.candidates)
    [received] = await federation.wait_for_notifications(1)
    assert received.notification.ident_match.immigration_history.subject_id == sample.truth.ident_subject_id


async def test_a_node_sends_records_with_hit_candidates_only(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    # A hit threshold no score reaches and a review threshold every score does (fused scores are
    # log-likelihood ratios, negative for most non-mates): every candidate, the mate included, is
    # in the review band.
    config = NodeConfig(
        node="ident", data_dir=tmp_path, tls=pki["ident"], thresholds=Thresholds(hit=1e6, review=-1e6)
    )
    node = build_node(config)
    await node.start()
    try:
        await enroll(node.host.address, population.ident, tls=pki["admin"])
        sample = pick(population, iafis=False, ident=True)
        async with open_channel(node.host.address, pki["coordinator"], retries=False) as channel:
            response = await gal_grpc.GalleryServiceStub(channel).Identify(
                gal.IdentifyRequest(probes=[gal.Probe(probe_id="P-1", tenprint=sample.booking.tenprint)]),
                timeout=30,
            )
    finally:
        await node.stop(0)
    [result] = response.results
    assert result.decision == bio.REVIEW
    assert result.candidates[0].subject_id == sample.truth.ident_subject_id
    assert all(c.band == bio.REVIEW and c.WhichOneof("record") is None for c in result.candidates)


async def test_an_expired_certificate_is_refused_at_the_handshake(
    federation: Federation, population: Population, pki: dict[str, TlsFiles]
) -> None:
    ori = population.bookings[0].booking.ori
    now = dt.datetime.now(dt.UTC)
    expired = DevCa.load(pki["admin"].ca.parent).issue(
        "agency-expired",
        Role.BOOKING_AGENCY,
        ori=ori,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    async with open_channel(federation.address, expired) as channel:
        error = await refused(
            # Longer than the channel's retries of UNAVAILABLE take, so their last answer shows.
            bk_grpc.BookingServiceStub(channel).GetDecision(bk.GetDecisionRequest(tcn="TCN-1"), timeout=30)
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
