"""Examiner review over real gRPC servers: a borderline IDENT match opens a review instead of a
notification; an examiner (by certificate) claims it, sees both ten-prints and the candidate's
record, and confirms (exactly one ICE notice) or rejects (none); a borderline IAFIS match opens a
review too, and its criminal history counts (and reaches the agency) only once an examiner
confirms it; every step is audited."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from calibration.thresholds import Thresholds
from cli.app import app
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.records.v1 import records_pb2 as rec
from fedprint.review.v1 import review_pb2 as rv
from fedprint.review.v1 import review_pb2_grpc as rv_grpc
from synthetic.population import Population, SyntheticBooking
from tests.conftest import Federation, key


def ident_review(sample: SyntheticBooking) -> str:
    """The id of the review of ``sample``'s IDENT candidate."""
    return f"{key(sample.booking)}/ident"


def ident_mates(population: Population) -> list[SyntheticBooking]:
    return [b for b in population.bookings if b.truth.ident_subject_id and b.truth.expect_notification]


async def in_review(federation: Federation, sample: SyntheticBooking) -> bk.BookingDecision:
    decision = await federation.booking_stub(sample.booking.ori).SubmitBooking(sample.booking, timeout=30)
    # The agency is not told of an IDENT review: nothing is referred to ICE until a person decides.
    assert decision.status == bk.COMPLETE and decision.notification == bk.NOT_REQUIRED
    kept = federation.kept(sample.booking)
    assert kept.notification == bk.EXAMINER_REVIEW
    assert kept.ident.candidates[0].subject_id == sample.truth.ident_subject_id
    return kept


async def review_band_for_every_mate(federation: Federation, node: str) -> Federation:
    """``federation`` with ``node`` restarted on a hit threshold no one reaches: every mate of
    that node lands in the review band (non-mates stay below it)."""
    await getattr(federation, node).stop(0)
    # Fused scores are log-likelihood ratios: ten-print mates sum far above 0, non-mates far below.
    thresholds = Thresholds(hit=1e6, review=0.0, source="test: review band for every mate")
    await federation.restart_node(node, thresholds=thresholds)
    return federation


@pytest.fixture
async def reviewing(federation: Federation) -> Federation:
    """The federation with every IDENT mate in the review band."""
    return await review_band_for_every_mate(federation, "ident")


async def test_a_confirmed_review_notifies_ice_once_and_a_rejected_one_not_at_all(
    reviewing: Federation, population: Population
) -> None:
    confirm, reject = ident_mates(population)[:2]
    await in_review(reviewing, confirm)
    await in_review(reviewing, reject)
    assert await reviewing.notifications() == []  # a borderline match notifies no one by itself

    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    listed = (await examiner.ListReviews(rv.ListReviewsRequest(), timeout=5)).reviews
    assert [r.review_id for r in listed] == [ident_review(confirm), ident_review(reject)]  # oldest first
    first = listed[0]
    assert first.state == rv.OPEN and first.age_s >= 0.0 and first.opened_at.seconds > 0
    assert first.candidate.subject_id == confirm.truth.ident_subject_id
    assert first.candidate.WhichOneof("record") is None and first.candidate.finger_scores

    case = await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=ident_review(confirm)), timeout=10)
    assert case.review.state == rv.CLAIMED and "examiner" in case.review.examiner
    assert len(case.probe.fingers) == len(confirm.booking.tenprint.fingers)
    assert (
        case.candidate_tenprint.fingers and case.candidate_record.subject_id == confirm.truth.ident_subject_id
    )

    decided = await examiner.DecideReview(
        rv.DecideReviewRequest(
            review_id=ident_review(confirm), verdict=rv.CONFIRM, note="ridge detail agrees"
        ),
        timeout=10,
    )
    assert decided.state == rv.CONFIRMED and decided.note == "ridge detail agrees"
    (notice,) = await reviewing.wait_for_notifications(1)
    assert notice.notification.tcn == confirm.booking.tcn
    assert notice.notification.ident_match.immigration_history.subject_id == confirm.truth.ident_subject_id
    assert any("examiner" in reason and "confirmed" in reason for reason in notice.notification.reasons)

    await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=ident_review(reject)), timeout=10)
    rejected = await examiner.DecideReview(
        rv.DecideReviewRequest(review_id=ident_review(reject), verdict=rv.REJECT, note="cores differ"),
        timeout=10,
    )
    assert rejected.state == rv.REJECTED
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await examiner.DecideReview(
            rv.DecideReviewRequest(review_id=ident_review(reject), verdict=rv.CONFIRM), timeout=10
        )
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [n.notification.tcn for n in await reviewing.wait_for_notifications(2)] == [confirm.booking.tcn]

    agency = reviewing.booking_stub(reject.booking.ori)
    closed = await agency.GetDecision(bk.GetDecisionRequest(tcn=reject.booking.tcn), timeout=5)
    assert closed.notification == bk.NOT_REQUIRED and not any("cores differ" in r for r in closed.reasons)
    kept = reviewing.kept(reject.booking)
    assert kept.notification == bk.NOT_REQUIRED and "rejected" in kept.reasons[-1]
    store = reviewing.coordinator.coordinator.store
    assert [e for e, _ in store.audit(key(confirm.booking))][:4] == [
        "decision",
        "review_opened",
        "review_claimed",
        "review_confirmed",
    ]
    assert [e for e, _ in store.audit(key(reject.booking))] == [
        "decision",
        "review_opened",
        "review_claimed",
        "review_rejected",
    ]
    assert store.verify_audit()[1] is None
    assert (await examiner.ListReviews(rv.ListReviewsRequest(), timeout=5)).reviews == []


async def test_only_examiners_review_and_a_decision_needs_a_claim(
    reviewing: Federation, population: Population
) -> None:
    sample = ident_mates(population)[0]
    await in_review(reviewing, sample)
    agency = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, f"agency-{sample.booking.ori}"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await agency.ListReviews(rv.ListReviewsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    with pytest.raises(grpc.aio.AioRpcError) as unclaimed:
        await examiner.DecideReview(
            rv.DecideReviewRequest(review_id=ident_review(sample), verdict=rv.CONFIRM), timeout=5
        )
    assert unclaimed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await examiner.ClaimReview(rv.ClaimReviewRequest(review_id="XX0010000/TCN-NO-SUCH/ident"), timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    for malformed in (
        "TCN-NO-SUCH",
        "XX0010000/TCN-NO-SUCH/ice",
        "/ident",
        "TCN-NO-SUCH/ident",  # no ORI: a TCN is its agency's
        "XX/TCN/ident",
        "XX0010000/TCN NO/ident",
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=malformed), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, malformed


async def test_the_examiner_works_a_review_from_the_command_line(
    reviewing: Federation, population: Population, tmp_path: Path
) -> None:
    sample = ident_mates(population)[0]
    await in_review(reviewing, sample)
    pki_dir = reviewing.pki["examiner"].cert.parent
    common = ["--address", reviewing.address, "--tls-dir", str(pki_dir)]
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["review", *args, *common])
        assert result.exit_code == 0, result.output
        return result.output

    listed = json.loads(await asyncio.to_thread(run, "list", "--json"))
    assert [r["review_id"] for r in listed] == [ident_review(sample)] and listed[0]["state"] == "open"
    png = tmp_path / "case.png"
    shown = await asyncio.to_thread(run, "show", ident_review(sample), "--png", str(png))
    assert sample.truth.ident_subject_id in shown and "per finger" in shown
    assert png.stat().st_size > 10_000  # a drawing of the fingers, not an empty canvas
    await asyncio.to_thread(run, "confirm", ident_review(sample), "--note", "checked by eye")
    (notice,) = await reviewing.wait_for_notifications(1)
    assert notice.notification.tcn == sample.booking.tcn


def test_the_pairs_shown_to_an_examiner_are_those_behind_the_score() -> None:
    import numpy as np

    from gpu_kernels import MccParams
    from gpu_kernels.cylinders import encode_fingers
    from gpu_kernels.similarity import matched_pairs, score_fingers
    from synthetic.fingers import impression, master_finger

    rng = np.random.default_rng(3)
    master = master_finger(rng, 2)
    probe = encode_fingers([impression(rng, master, quality=0.8)], MccParams())
    gallery = encode_fingers([master], MccParams())
    for params in (MccParams(), MccParams(consolidation="lss")):
        explained = matched_pairs(probe, gallery, params)
        assert explained.score == pytest.approx(float(score_fingers(probe, gallery, params)[0, 0]), abs=1e-6)
        assert len(explained.pairs) >= 4
        strengths = [s for _, _, s in explained.pairs]
        assert strengths == sorted(strengths, reverse=True) and strengths[0] > 0


async def test_an_examiners_confirmation_of_a_naturalized_citizen_is_suppressed_by_the_policy(
    reviewing: Federation, population: Population
) -> None:
    # The examiner confirms identity; the policy decides what follows, as for an automated hit.
    citizen = next(
        b
        for b in population.bookings
        if b.truth.ident_subject_id and b.truth.ident_status == rec.NATURALIZED_CITIZEN
    )
    await in_review(reviewing, citizen)
    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=ident_review(citizen)), timeout=10)
    confirmed = await examiner.DecideReview(
        rv.DecideReviewRequest(review_id=ident_review(citizen), verdict=rv.CONFIRM, note="same person"),
        timeout=10,
    )
    assert confirmed.state == rv.CONFIRMED
    agency = reviewing.booking_stub(citizen.booking.ori)
    final = reviewing.kept(citizen.booking)
    assert final.notification == bk.SUPPRESSED
    assert any("confirmed the IDENT match" in r for r in final.reasons)  # what the examiner did
    assert any("notification suppressed" in r for r in final.reasons)  # what the policy did with it
    # The jail learns only that no one was referred: not the match, the status, nor the note.
    seen = await agency.GetDecision(bk.GetDecisionRequest(tcn=citizen.booking.tcn), timeout=5)
    assert seen.notification == bk.NOT_REQUIRED and not seen.ident.candidates
    assert not any("IDENT" in r or "suppressed" in r or "same person" in r for r in seen.reasons)
    store = reviewing.coordinator.coordinator.store
    assert store.outbox_attempts(key(citizen.booking)) is None  # no notice was ever queued
    assert await reviewing.notifications() == []
    (_, detail) = next((e, d) for e, d in store.audit(key(citizen.booking)) if e == "review_confirmed")
    assert "notification SUPPRESSED" in detail


async def test_reviews_waiting_too_long_are_reported_overdue(
    reviewing: Federation, population: Population
) -> None:
    sample = ident_mates(population)[0]
    await in_review(reviewing, sample)
    examiner = rv_grpc.ReviewServiceStub(reviewing.channel(reviewing.address, "examiner"))
    admin = bk_grpc.BookingServiceStub(reviewing.channel(reviewing.address, "admin"))
    assert (await examiner.ListReviews(rv.ListReviewsRequest(overdue=True), timeout=5)).reviews == []
    stats = await admin.GetStats(bk.GetStatsRequest(), timeout=5)
    assert (stats.open_reviews, stats.overdue_reviews) == (1, 0)
    reviewing.coordinator.coordinator.config.review_overdue_s = 1e-6  # every waiting review is late
    overdue = (await examiner.ListReviews(rv.ListReviewsRequest(overdue=True), timeout=5)).reviews
    assert [r.review_id for r in overdue] == [ident_review(sample)]
    stats = await admin.GetStats(bk.GetStatsRequest(), timeout=5)
    assert stats.overdue_reviews == 1 and stats.oldest_open_review_age_s > 0.0


@pytest.fixture
async def iafis_reviewing(federation: Federation) -> Federation:
    """The federation with every IAFIS mate in the review band."""
    return await review_band_for_every_mate(federation, "iafis")


async def test_a_borderline_iafis_match_counts_only_once_an_examiner_confirms_it(
    iafis_reviewing: Federation, population: Population
) -> None:
    policy = iafis_reviewing.coordinator.coordinator.policy

    def charges_level(sample: SyntheticBooking) -> int:
        return int(policy.booking_level(sample.booking.charges, None)[0])

    mates = [b for b in population.bookings if b.truth.iafis_subject_id]
    # Someone whose convictions make the booking more severe than its charges alone.
    confirm = next(b for b in mates if b.truth.expected_level < charges_level(b))
    reject = next(b for b in mates if b is not confirm)
    agency = iafis_reviewing.booking_stub(confirm.booking.ori)
    for sample in (confirm, reject):
        decision = await iafis_reviewing.booking_stub(sample.booking.ori).SubmitBooking(
            sample.booking, timeout=30
        )
        assert decision.status == bk.COMPLETE and decision.iafis.band == bio.REVIEW
        top = decision.iafis.candidates[0]
        assert top.subject_id == sample.truth.iafis_subject_id
        # Before a person has looked: no criminal history for the agency, none in the level.
        assert top.WhichOneof("record") is None and decision.level == charges_level(sample)
        assert any("criminal history not used until an examiner verifies" in r for r in decision.reasons)

    examiner = rv_grpc.ReviewServiceStub(iafis_reviewing.channel(iafis_reviewing.address, "examiner"))
    listed = (await examiner.ListReviews(rv.ListReviewsRequest(), timeout=5)).reviews
    iafis_reviews = [r for r in listed if r.node == "iafis"]
    assert [r.review_id for r in iafis_reviews] == [
        f"{key(confirm.booking)}/iafis",
        f"{key(reject.booking)}/iafis",
    ]
    assert iafis_reviews[0].candidate.subject_id == confirm.truth.iafis_subject_id

    case = await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=iafis_reviews[0].review_id), timeout=10)
    assert case.candidate_criminal_history.subject_id == confirm.truth.iafis_subject_id
    assert case.candidate_tenprint.fingers and not case.candidate_record.subject_id  # no IDENT record
    await examiner.DecideReview(
        rv.DecideReviewRequest(review_id=iafis_reviews[0].review_id, verdict=rv.CONFIRM, note="same cores"),
        timeout=10,
    )
    final = await agency.GetDecision(bk.GetDecisionRequest(tcn=confirm.booking.tcn), timeout=5)
    assert final.iafis.confirmed_subject_id == confirm.truth.iafis_subject_id
    assert final.iafis.candidates[0].criminal_history.subject_id == confirm.truth.iafis_subject_id
    assert final.level == confirm.truth.expected_level  # the convictions count now
    assert any("confirmed the IAFIS match" in r for r in final.reasons)
    assert not any("same cores" in r for r in final.reasons)  # the examiner's note stays inside

    await examiner.ClaimReview(rv.ClaimReviewRequest(review_id=iafis_reviews[1].review_id), timeout=10)
    await examiner.DecideReview(
        rv.DecideReviewRequest(review_id=iafis_reviews[1].review_id, verdict=rv.REJECT, note="deltas differ"),
        timeout=10,
    )
    other = iafis_reviewing.booking_stub(reject.booking.ori)
    closed = await other.GetDecision(bk.GetDecisionRequest(tcn=reject.booking.tcn), timeout=5)
    assert not closed.iafis.confirmed_subject_id and closed.iafis.candidates[0].WhichOneof("record") is None
    assert closed.level == charges_level(reject) and "rejected the IAFIS candidate" in closed.reasons[-1]
    assert "rejected the IAFIS match" in iafis_reviewing.kept(reject.booking).reasons[-1]
    store = iafis_reviewing.coordinator.coordinator.store
    assert store.verify_audit()[1] is None
