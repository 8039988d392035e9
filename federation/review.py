"""``fedprint.review.v1.ReviewService``: examiners confirm or reject borderline IDENT matches.

A booking whose IDENT candidate lands in the review band is decided EXAMINER_REVIEW and opens
a review (the coordinator keeps the booking sealed for it). An examiner, known by the client
certificate, lists reviews, claims one (the coordinator then fetches the candidate's enrolled
prints and record from the IDENT node, for this examiner only), and decides. The examiner
confirms identity, never policy: a confirmation goes through the same threat policy as an
automated hit (:meth:`federation.policy.ThreatPolicy.ident_identity`), so a suppression rule
stops the notice as it would have stopped an automated one, and the decision records both what
the examiner confirmed and what the policy did with it. A rejection closes the case with no
notification. A claim runs out after ``review_claim_s`` and the review returns to the queue.
Each step is audited, and the updated decision goes out on ``WatchDecisions``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from federation.sealing import SealingError
from federation.store import ReviewConflict, Verdict
from fedprint.access import current_caller
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.review.v1 import review_pb2 as rv
from fedprint.review.v1 import review_pb2_grpc as rv_grpc
from fedprint.rpc import InvalidRequest, abort_invalid
from fedprint.validation import TCN, Violations

if TYPE_CHECKING:
    from federation.coordinator import Coordinator

log = structlog.get_logger(__name__)

MAX_NOTE = 1000
MAX_LIST = 1000


def opened_review(evidence: bk.BookingDecision) -> rv.Review:
    """The review a decision in EXAMINER_REVIEW opens: its IDENT candidate's scores (no record),
    the thresholds, level and reasons."""
    candidate = gal.Candidate()
    candidate.CopyFrom(evidence.ident.candidates[0])
    candidate.ClearField("record")
    return rv.Review(
        candidate=candidate,
        thresholds=evidence.ident.thresholds,
        level=evidence.level,
        reasons=evidence.reasons,
    )


def _examiner() -> str:
    identity = current_caller().identity
    return identity.subject if identity is not None else "examiner (insecure mode)"


class ReviewServicer(rv_grpc.ReviewServiceServicer):
    """ListReviews, ClaimReview and DecideReview on the coordinator's store and IDENT node."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.store = coordinator.store

    async def ListReviews(
        self, request: rv.ListReviewsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rv.ListReviewsResponse:
        await self._release_expired()
        states = [request.state] if request.state else [rv.OPEN, rv.CLAIMED]
        limit = min(request.limit or 100, MAX_LIST)
        overdue_s = self.coordinator.config.review_overdue_s if request.overdue else None
        reviews = await asyncio.to_thread(self.store.reviews, states, limit, overdue_s=overdue_s)
        return rv.ListReviewsResponse(reviews=reviews)

    async def _release_expired(self) -> None:
        released = await asyncio.to_thread(
            self.store.release_expired_claims, self.coordinator.config.review_claim_s
        )
        if released:
            log.info("review claims expired", reviews=released)

    async def _check_id(self, review_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        violations = Violations()
        if not TCN.check(review_id, "review_id", violations):
            await abort_invalid(context, InvalidRequest(violations, "malformed request"))

    async def ClaimReview(
        self, request: rv.ClaimReviewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rv.ReviewCase:
        await self._check_id(request.review_id, context)
        examiner = _examiner()
        await self._release_expired()
        try:
            claimed = await asyncio.to_thread(self.store.claim_review, request.review_id, examiner)
        except ReviewConflict as conflict:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(conflict))
        if claimed is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no review {request.review_id}")
        review, sealed = claimed
        case = rv.ReviewCase(review=review)
        try:
            case.probe.CopyFrom(self.coordinator.open_booking(review.review_id, sealed).tenprint)
        except SealingError:
            await context.abort(
                grpc.StatusCode.DATA_LOSS, f"the booking of review {review.review_id} does not open"
            )
        subject = await self._subject(review, context)
        case.candidate_tenprint.CopyFrom(subject.tenprint)
        case.candidate_record.CopyFrom(subject.immigration_history)
        log.info("review claimed", tcn=review.review_id, examiner=examiner)
        return case

    async def _subject(self, review: rv.Review, context: grpc.aio.ServicerContext[Any, Any]) -> gal.Subject:
        """The candidate's prints and record, from the IDENT node (for the examiner working it)."""
        try:
            return await self.coordinator.ident.stub.GetSubject(
                gal.GetSubjectRequest(subject_id=review.candidate.subject_id),
                timeout=self.coordinator.config.node_deadline_s,
            )
        except grpc.aio.AioRpcError as error:
            code = grpc.StatusCode.UNAVAILABLE if error.code() != grpc.StatusCode.NOT_FOUND else error.code()
            await context.abort(
                code, f"IDENT could not give subject {review.candidate.subject_id}: {error.details()}"
            )
            raise  # unreachable: abort raises

    async def DecideReview(
        self, request: rv.DecideReviewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rv.Review:
        await self._check_id(request.review_id, context)
        violations = Violations()
        if request.verdict not in (rv.CONFIRM, rv.REJECT):
            violations.add("verdict", "CONFIRM or REJECT")
        if len(request.note) > MAX_NOTE or not request.note.isprintable():
            violations.add("note", f"at most {MAX_NOTE} printable characters")
        if violations:
            await abort_invalid(context, InvalidRequest(violations, "malformed request"))
        examiner = _examiner()
        tcn = request.review_id
        if request.verdict == rv.CONFIRM:
            verdict = await self._confirmation(tcn, examiner, request.note, context)
        else:
            rejected = f"examiner {examiner} rejected the IDENT match" + (
                f": {request.note}" if request.note else ""
            )
            verdict = Verdict(rv.REJECT, bk.NOT_REQUIRED, (rejected,))
        try:
            review, decision = await asyncio.to_thread(
                self.store.decide_review, tcn, examiner, verdict, request.note
            )
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no review {tcn}")
        except ReviewConflict as conflict:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(conflict))
        if verdict.notification is not None:
            self.coordinator.outbox.wake()
        if decision is not None:
            self.coordinator.feed.publish(decision)
        log.info("review decided", tcn=tcn, examiner=examiner, verdict=rv.Verdict.Name(request.verdict))
        return review

    async def _confirmation(
        self, tcn: str, examiner: str, note: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Verdict:
        """What a confirmation does: the policy applied to the now established IDENT identity
        (with the record the IDENT node gives for the candidate), and the ICE notice when the
        policy queues one: the booking, the stored decision's evidence and the candidate."""
        try:
            claimed = await asyncio.to_thread(self.store.held_review, tcn, examiner)
        except ReviewConflict as conflict:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(conflict))
        decision = await asyncio.to_thread(self.store.decision, tcn)
        if claimed is None or decision is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no review {tcn}")
        review, sealed = claimed
        try:
            booking = self.coordinator.open_booking(tcn, sealed)
        except SealingError:
            await context.abort(grpc.StatusCode.DATA_LOSS, f"the booking of review {tcn} does not open")
        subject = await self._subject(review, context)
        confirmed = f"examiner {examiner} confirmed the IDENT match {review.candidate.subject_id}" + (
            f": {note}" if note else ""
        )
        outcome = self.coordinator.policy.ident_identity(
            decision.level, subject.immigration_history, [confirmed]
        )
        if outcome.notification != bk.QUEUED:
            log.info("confirmed review not notified", tcn=tcn, notification=outcome.notification)
            return Verdict(rv.CONFIRM, outcome.notification, tuple(outcome.reasons))
        evidence = bk.BookingDecision()
        evidence.CopyFrom(decision)
        match = evidence.ident.candidates[0]
        match.CopyFrom(review.candidate)
        match.immigration_history.CopyFrom(subject.immigration_history)
        evidence.reasons.extend(outcome.reasons)
        notification = self.coordinator.notification(booking, evidence)
        return Verdict(rv.CONFIRM, bk.QUEUED, tuple(outcome.reasons), notification)
