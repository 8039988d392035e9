"""Need to know, over real services on loopback with mTLS: a gallery node releases a subject's
prints and record (GetSubject) only to the caller it returned that subject to, as the deciding
candidate of a probe in the review or hit band, for that probe, within its release window; each
release is recorded with its review. The coordinator's certificate alone dumps nothing, whole
node or sharded."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import DevCa, Role, TlsFiles, identity_of
from fedprint.review.v1 import review_pb2 as rv
from fedprint.review.v1 import review_pb2_grpc as rv_grpc
from fedprint.rpc import open_channel
from nodes.gallery.store import GalleryStore, ReturnedCandidate
from nodes.ident.records import ImmigrationHistoryStore
from synthetic.population import Population, SyntheticBooking
from tests.conftest import Federation
from tests.sharding import sharded_federation
from tests.test_review import ident_mates, ident_review, in_review, review_band_for_every_mate

DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
async def reviewing(federation: Federation) -> Federation:
    """The federation with every IDENT mate in the review band."""
    return await review_band_for_every_mate(federation, "ident")


def non_mate(population: Population) -> SyntheticBooking:
    return next(b for b in population.bookings if not b.truth.ident_subject_id)


async def denied(stub: gal_grpc.GalleryServiceAsyncStub, request: gal.GetSubjectRequest) -> str:
    """Asks for the subject, expecting PERMISSION_DENIED; returns the refusal's message."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetSubject(request, timeout=10)
    assert refused.value.code() == DENIED, refused.value.details()
    return refused.value.details() or ""


async def test_the_coordinators_certificate_gets_no_subject_the_node_did_not_return_to_it_for_review(
    reviewing: Federation, population: Population
) -> None:
    node = gal_grpc.GalleryServiceStub(reviewing.channel(reviewing.ident.host.address, "coordinator"))
    mate, other = ident_mates(population)[:2]
    subject = mate.truth.ident_subject_id
    # Nothing returned yet: enrolled or not, the same refusal (no hint whether the subject exists).
    refusal = await denied(node, gal.GetSubjectRequest(subject_id=subject, probe_id=mate.booking.tcn))
    assert refusal == await denied(
        node, gal.GetSubjectRequest(subject_id="NO-SUCH-SUBJECT", probe_id=mate.booking.tcn)
    )
    assert await denied(node, gal.GetSubjectRequest(subject_id=subject)) == refusal  # no probe named

    # A search whose best candidate is no hit releases nothing.
    stranger = non_mate(population)
    answer = await node.Identify(
        gal.IdentifyRequest(probes=[gal.Probe(probe_id="P-STRANGER", tenprint=stranger.booking.tenprint)]),
        timeout=30,
    )
    (result,) = answer.results
    assert result.decision == bio.NO_HIT and result.candidates
    await denied(
        node, gal.GetSubjectRequest(subject_id=result.candidates[0].subject_id, probe_id="P-STRANGER")
    )

    # The booking puts the mate in the review band: the examiner's claim gets prints and record.
    await in_review(reviewing, mate)
    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    case = await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=ident_review(mate)), timeout=10)
    assert case.candidate_tenprint.fingers and case.candidate_record.subject_id == subject
    # ...for that booking only: not under another probe, and no other subject under this one.
    await denied(node, gal.GetSubjectRequest(subject_id=subject, probe_id=other.booking.tcn))
    await denied(
        node,
        gal.GetSubjectRequest(subject_id=other.truth.ident_subject_id, probe_id=mate.booking.tcn),
    )
    # Each release is recorded with its review and the examiner.
    coordinator = identity_of(reviewing.pki["coordinator"].cert.read_bytes()).subject
    (release,) = reviewing.ident.servicer.store.releases(mate.booking.tcn)
    assert (release.caller, release.subject_id) == (coordinator, subject)
    assert "examiner" in release.examiner
    # The examiner decides: the node gives the record again for the same review.
    await examiner.DecideReview(
        rv.DecideReviewRequest(review_id=ident_review(mate), verdict=rv.CONFIRM, note="same person"),
        timeout=10,
    )
    assert len(reviewing.ident.servicer.store.releases(mate.booking.tcn)) == 2


async def test_what_a_node_returned_survives_its_restart_and_is_not_anothers(
    reviewing: Federation, population: Population, tmp_path: Path
) -> None:
    mate = ident_mates(population)[0]
    await in_review(reviewing, mate)
    await reviewing.ident.stop(0)
    await reviewing.restart_node("ident", thresholds=reviewing.ident.servicer.config.thresholds)
    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    case = await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=ident_review(mate)), timeout=10)
    assert case.candidate_record.subject_id == mate.truth.ident_subject_id

    # Another coordinator certificate (another deployment's, say) was given nothing.
    other: TlsFiles = DevCa.open(reviewing.pki["coordinator"].ca.parent).issue(
        "coordinator-elsewhere", Role.COORDINATOR
    )
    channel = open_channel(reviewing.ident.host.address, other, retries=False)
    reviewing.channels.append(channel)
    await denied(
        gal_grpc.GalleryServiceStub(channel),
        gal.GetSubjectRequest(subject_id=mate.truth.ident_subject_id, probe_id=mate.booking.tcn),
    )


async def test_a_review_waiting_longer_than_the_release_window_gets_nothing(
    reviewing: Federation, population: Population
) -> None:
    await reviewing.ident.stop(0)
    # A window shorter than any search: what the node returns has expired by the time it is asked.
    await reviewing.restart_node(
        "ident", thresholds=reviewing.ident.servicer.config.thresholds, release_window_s=1e-6
    )
    mate = ident_mates(population)[0]
    await in_review(reviewing, mate)
    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=ident_review(mate)), timeout=10)
    assert expired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "releases a subject only" in (expired.value.details() or "")
    assert reviewing.ident.servicer.store.releases(mate.booking.tcn) == []


async def test_a_review_the_node_has_forgotten_is_searched_again_and_then_released(
    reviewing: Federation, population: Population
) -> None:
    mate = ident_mates(population)[0]
    await in_review(reviewing, mate)
    store = reviewing.ident.servicer.store
    # The node forgets what it returned, as it does once the release window has passed.
    assert store.purge_returned(dt.datetime.now(dt.UTC) + dt.timedelta(days=1), keep=1) >= 1
    node = gal_grpc.GalleryServiceStub(reviewing.channel(reviewing.ident.host.address, "coordinator"))
    request = gal.GetSubjectRequest(subject_id=mate.truth.ident_subject_id, probe_id=mate.booking.tcn)
    await denied(node, request)
    # The claim searches the sealed booking again against the candidate alone: the node returns
    # it again, and releases it.
    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    case = await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=ident_review(mate)), timeout=30)
    assert case.candidate_record.subject_id == mate.truth.ident_subject_id
    assert [r.subject_id for r in store.releases(mate.booking.tcn)] == [mate.truth.ident_subject_id]


async def test_a_sharded_nodes_router_releases_only_what_it_returned(
    tmp_path: Path, population: Population, pki: dict[str, TlsFiles]
) -> None:
    async with sharded_federation(tmp_path, population, pki, shards=2) as fed:
        coordinator = fed.channel(fed.ident.address, "coordinator")
        router = gal_grpc.GalleryServiceStub(coordinator)
        mate = ident_mates(population)[0]
        subject = mate.truth.ident_subject_id
        request = gal.GetSubjectRequest(subject_id=subject, probe_id="P-MATE", examiner="E. Xaminer")
        refusal = await denied(router, request)
        assert refusal == await denied(
            router, gal.GetSubjectRequest(subject_id="NO-SUCH-SUBJECT", probe_id="P-MATE")
        )
        answer = await router.Identify(
            gal.IdentifyRequest(probes=[gal.Probe(probe_id="P-MATE", tenprint=mate.booking.tenprint)]),
            timeout=30,
        )
        (result,) = answer.results
        assert result.decided_by == subject and result.decision in (bio.HIT, bio.REVIEW)
        released = await router.GetSubject(request, timeout=10)
        assert released.tenprint.fingers and released.immigration_history.subject_id == subject
        await denied(router, gal.GetSubjectRequest(subject_id=subject, probe_id="P-OTHER"))
        # The router recorded it in the node's database, which every replica of it reads.
        (release,) = fed.ident.router.router.releases.store.releases("P-MATE")
        assert (release.subject_id, release.examiner) == (subject, "E. Xaminer")
        # A shard answers its router only, whatever the coordinator was given.
        shard = gal_grpc.GalleryServiceStub(fed.channel(fed.ident.shards[0].host.address, "coordinator"))
        await denied(shard, request)


def test_the_record_of_returned_candidates_expires_and_stays_bounded(database_url: str) -> None:
    store = GalleryStore(database_url, ImmigrationHistoryStore())
    try:
        returned = [ReturnedCandidate("CN=coordinator", f"P-{i}", f"FIN-{i}", bio.REVIEW) for i in range(5)]
        for candidate in returned:  # one at a time: each its own time
            store.record_returned([candidate])
        now = dt.datetime.now(dt.UTC)
        assert store.returned_since("CN=coordinator", "P-4", "FIN-4", now - dt.timedelta(hours=1))
        assert not store.returned_since("CN=elsewhere", "P-4", "FIN-4", now - dt.timedelta(hours=1))
        # Bounded: beyond the newest three, the oldest go.
        assert store.purge_returned(now - dt.timedelta(hours=1), keep=3) == 2
        kept = [
            c.probe_id
            for c in returned
            if store.returned_since(c.caller, c.probe_id, c.subject_id, now - dt.timedelta(hours=1))
        ]
        assert kept == ["P-2", "P-3", "P-4"]
        # Expired: everything returned before the window's start.
        assert store.purge_returned(now + dt.timedelta(seconds=1), keep=100) == 3
        assert not store.returned_since("CN=coordinator", "P-4", "FIN-4", now - dt.timedelta(hours=1))
    finally:
        store.close()
