"""A booking is its agency's: its identity is (ORI, TCN). Over real services and mTLS, two
agencies may use one TCN without meeting; an agency's resubmission is compared with its own
booking only; another agency's TCN looks exactly like one that does not exist."""

from __future__ import annotations

import grpc
import pytest

from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.records.v1 import records_pb2 as rec
from synthetic.population import Population, SyntheticBooking
from tests.conftest import Federation
from tests.test_federation_e2e import pick, with_tcn


def as_agency(booking: bk.Booking, ori: str, tcn: str) -> bk.Booking:
    """``booking`` as agency ``ori`` sends it under ``tcn``."""
    copy = with_tcn(booking, tcn)
    copy.ori = ori
    return copy


def two_agencies(population: Population) -> tuple[str, str]:
    oris = sorted({b.booking.ori for b in population.bookings})
    assert len(oris) >= 2, "the population needs bookings of two agencies"
    return oris[0], oris[1]


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_two_agencies_may_use_one_tcn_and_each_gets_its_own_decision(
    federation: Federation, population: Population
) -> None:
    a, b = two_agencies(population)
    notifying: SyntheticBooking = pick(population, iafis=False, ident=True, notify=True)
    stranger = pick(population, iafis=False, ident=False)
    # B takes the TCN first; A's own booking of it is another booking, decided on its own.
    first = await federation.booking_stub(b).SubmitBooking(
        as_agency(notifying.booking, b, "TCN-SHARED-1"), timeout=30
    )
    second = await federation.booking_stub(a).SubmitBooking(
        as_agency(stranger.booking, a, "TCN-SHARED-1"), timeout=30
    )
    assert (first.ori, second.ori) == (b, a)
    assert first.notification == bk.QUEUED and second.notification == bk.NOT_REQUIRED
    assert federation.kept(as_agency(notifying.booking, b, "TCN-SHARED-1")).ori == b
    assert federation.kept(as_agency(stranger.booking, a, "TCN-SHARED-1")).ori == a
    # Each agency reads its own.
    for ori, expected in ((a, second), (b, first)):
        read = await federation.booking_stub(ori).GetDecision(
            bk.GetDecisionRequest(tcn="TCN-SHARED-1"), timeout=5
        )
        assert read.ori == ori and read.decided_at == expected.decided_at
    # A referral of A's booking of the TCN is a notice of its own at ICE, not a duplicate of B's.
    await federation.booking_stub(a).SubmitBooking(
        as_agency(notifying.booking, a, "TCN-SHARED-2"), timeout=30
    )
    await federation.booking_stub(b).SubmitBooking(
        as_agency(notifying.booking, b, "TCN-SHARED-2"), timeout=30
    )
    received = await federation.wait_for_notifications(3)
    shared = sorted((n.notification.ori, n.notification.tcn) for n in received)
    assert shared == sorted([(b, "TCN-SHARED-1"), (a, "TCN-SHARED-2"), (b, "TCN-SHARED-2")])


async def test_another_agencys_tcn_looks_exactly_like_one_that_does_not_exist(
    federation: Federation, population: Population
) -> None:
    a, b = two_agencies(population)
    sample = pick(population, iafis=True, ident=False)
    taken = as_agency(sample.booking, b, "TCN-TAKEN-1")
    before = await federation.booking_stub(b).SubmitBooking(taken, timeout=30)
    agency = federation.booking_stub(a)
    theirs = await refused(agency.GetDecision(bk.GetDecisionRequest(tcn="TCN-TAKEN-1"), timeout=5))
    nobodys = await refused(agency.GetDecision(bk.GetDecisionRequest(tcn="TCN-TAKEN-2"), timeout=5))
    assert theirs.code() == nobodys.code() == grpc.StatusCode.NOT_FOUND
    assert theirs.details() == nobodys.details().replace("TCN-TAKEN-2", "TCN-TAKEN-1")
    # Asking for B's ORI outright is refused for the ORI, whatever the TCN.
    named = await refused(agency.GetDecision(bk.GetDecisionRequest(tcn="TCN-TAKEN-1", ori=b), timeout=5))
    unknown = await refused(agency.GetDecision(bk.GetDecisionRequest(tcn="TCN-NONE-9", ori=b), timeout=5))
    assert named.code() == unknown.code() == grpc.StatusCode.PERMISSION_DENIED
    assert named.details().replace("TCN-TAKEN-1", "") == unknown.details().replace("TCN-NONE-9", "")

    # A resubmission is compared with the agency's own booking only: A's booking of the TCN,
    # with other charges than B's, is a first submission, and says nothing of B's.
    mine = as_agency(sample.booking, a, "TCN-TAKEN-1")
    del mine.charges[:]
    mine.charges.add(ncic_code="2299", literal="BURGLARY")
    decision = await agency.SubmitBooking(mine, timeout=30)
    assert decision.status == bk.COMPLETE and decision.ori == a and decision.attempt == 1
    # ... and A's own resubmission with other charges again is refused, naming what differs.
    changed = as_agency(mine, a, "TCN-TAKEN-1")
    changed.charges[0].ncic_code = "1201"
    again = await refused(agency.SubmitBooking(changed, timeout=30))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS and "charges" in (again.details() or "")
    # B's booking is as B left it.
    after = await federation.booking_stub(b).GetDecision(bk.GetDecisionRequest(tcn="TCN-TAKEN-1"), timeout=5)
    assert after == before and after.level != rec.THREAT_LEVEL_UNSPECIFIED
