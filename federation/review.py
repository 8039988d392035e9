"""``fedprint.review.v1.ReviewService``: examiners confirm or reject borderline matches.

A complete decision opens a review for each node whose candidate carrying the decision lands in
the review band (the coordinator keeps the booking sealed for it): an IDENT one makes the
decision EXAMINER_REVIEW, an IAFIS one keeps that criminal history out of the threat level and
away from the agency. An examiner, known by the client certificate, lists reviews, claims one
(the coordinator then fetches the candidate's enrolled prints and record from that node, for
this examiner only), and decides. The examiner confirms identity, never policy: a confirmed
IDENT match goes through the same threat policy as an automated hit
(:meth:`federation.policy.ThreatPolicy.ident_identity`), so a suppression rule stops the notice
as it would have stopped an automated one; a confirmed IAFIS match adds the candidate's counted
convictions to the threat level (:meth:`federation.policy.ThreatPolicy.booking_level`) and its
criminal history to what the agency sees. The decision records both what the examiner confirmed
and what the policy did with it. A rejection closes the case and changes nothing else. A claim
runs out after ``review_claim_s`` and the review returns to the queue. Each step is audited, and
the updated decision goes out on ``WatchDecisions``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from federation.sealing import SealingError
from federation.store import REVIEW_NODES, ReviewConflict, Verdict, parse_review_id
from fedprint.access import current_caller
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.records.v1 import records_pb2 as rec
from fedprint.review.v1 import review_pb2 as rv
from fedprint.review.v1 import review_pb2_grpc as rv_grpc
from fedprint.rpc import InvalidRequest, abort_invalid
from fedprint.validation import ORI, TCN, Violations, booking_of

if TYPE_CHECKING:
    from federation.coordinator import Coordinator, NodeClient

log = structlog.get_logger(__name__)

MAX_NOTE = 1000
MAX_LIST = 1000


def opened_reviews(evidence: bk.BookingDecision) -> list[rv.Review]:
    """The reviews a complete decision opens: one per node whose first candidate (the one that
    carries its decision) is in the review band, with that candidate's scores (no record), the
    node's thresholds, the level and the reasons."""
    reviews = []
    for node in REVIEW_NODES:
        result: bk.NodeResult = getattr(evidence, node)
        if result.outcome != bk.ANSWERED or result.band != bio.REVIEW or not result.candidates:
            continue
        candidate = gal.Candidate()
        candidate.CopyFrom(result.candidates[0])
        candidate.ClearField("record")
        reviews.append(
            rv.Review(
                node=node,
                candidate=candidate,
                thresholds=result.thresholds,
                level=evidence.level,
                reasons=evidence.reasons,
            )
        )
    return reviews


#: What a node's refusal of GetSubject becomes for the examiner.
_SUBJECT_ERRORS = {
    grpc.StatusCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED: grpc.StatusCode.FAILED_PRECONDITION,
}


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

    async def _key(self, review_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
        """(booking key, node) of a review id; INVALID_ARGUMENT when it is malformed."""
        violations = Violations()
        try:
            key, node = parse_review_id(review_id)
        except ValueError as error:
            violations.add("review_id", str(error))
        else:
            ori, tcn = booking_of(key)
            if ORI.check(ori, "review_id", violations) & TCN.check(tcn, "review_id", violations):
                return key, node
        await abort_invalid(context, InvalidRequest(violations, "malformed request"))
        raise AssertionError("unreachable: abort raises")

    async def ClaimReview(
        self, request: rv.ClaimReviewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rv.ReviewCase:
        tcn, node = await self._key(request.review_id, context)
        examiner = _examiner()
        await self._release_expired()
        try:
            claimed = await asyncio.to_thread(self.store.claim_review, tcn, node, examiner)
        except ReviewConflict as conflict:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(conflict))
        if claimed is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no review {request.review_id}")
        review, sealed = claimed
        case = rv.ReviewCase(review=review)
        try:
            booking = self.coordinator.open_booking(tcn, sealed)
        except SealingError:
            await context.abort(
                grpc.StatusCode.DATA_LOSS, f"the booking of review {review.review_id} does not open"
            )
        case.probe.CopyFrom(booking.tenprint)
        subject = await self._subject(review, examiner, booking, context)
        case.candidate_tenprint.CopyFrom(subject.tenprint)
        if node == "ident":
            case.candidate_record.CopyFrom(subject.immigration_history)
        else:
            case.candidate_criminal_history.CopyFrom(subject.criminal_history)
        log.info("review claimed", tcn=tcn, node=node, examiner=examiner)
        return case

    async def _subject(
        self,
        review: rv.Review,
        examiner: str,
        booking: bk.Booking,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gal.Subject:
        """The candidate's prints and record, from the review's node (for the examiner working
        it). The node gives them only for the booking whose search returned the candidate to this
        coordinator, within its release window (need to know), and records the release with the
        TCN and the examiner. A review that waited past the window searches the booking again,
        against the candidate alone: the node gives the subject once it returns it again."""
        node = self.coordinator.iafis if review.node == "iafis" else self.coordinator.ident
        request = gal.GetSubjectRequest(
            subject_id=review.candidate.subject_id, probe_id=review.tcn, examiner=examiner
        )
        timeout = self.coordinator.config.node_deadline_s
        try:
            try:
                return await node.stub.GetSubject(request, timeout=timeout)
            except grpc.aio.AioRpcError as refused:
                if refused.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                if not await self._search_again(node, review, booking):
                    raise
            return await node.stub.GetSubject(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            # Removed since (NOT_FOUND), or no longer released for this booking (its release
            # window passed: FAILED_PRECONDITION); anything else is the node being unavailable.
            code = _SUBJECT_ERRORS.get(error.code(), grpc.StatusCode.UNAVAILABLE)
            subject = review.candidate.subject_id
            await context.abort(
                code, f"{review.node.upper()} could not give subject {subject}: {error.details()}"
            )
            raise  # unreachable: abort raises

    async def _search_again(self, node: NodeClient, review: rv.Review, booking: bk.Booking) -> bool:
        """Searches the booking against the review's candidate alone; whether the node returned
        it again as the deciding candidate in the review or hit band (and so will release it)."""
        request = gal.IdentifyRequest(
            probes=[gal.Probe(probe_id=booking.tcn, tenprint=booking.tenprint)],
            max_results=1,
            subject_ids=[review.candidate.subject_id],
        )
        try:
            response = await node.stub.Identify(request, timeout=self.coordinator.config.node_deadline_s)
        except grpc.aio.AioRpcError as error:
            log.warning("review search again failed", review=review.review_id, error=error.details())
            return False
        again = (
            len(response.results) == 1
            and response.results[0].decided_by == review.candidate.subject_id
            and response.results[0].decision in (bio.REVIEW, bio.HIT)
        )
        log.info("review searched again past the release window", review=review.review_id, returned=again)
        return again

    async def DecideReview(
        self, request: rv.DecideReviewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rv.Review:
        tcn, node = await self._key(request.review_id, context)
        violations = Violations()
        if request.verdict not in (rv.CONFIRM, rv.REJECT):
            violations.add("verdict", "CONFIRM or REJECT")
        if len(request.note) > MAX_NOTE or not request.note.isprintable():
            violations.add("note", f"at most {MAX_NOTE} printable characters")
        if violations:
            await abort_invalid(context, InvalidRequest(violations, "malformed request"))
        examiner = _examiner()
        if request.verdict == rv.CONFIRM:
            verdict = await self._confirmation(tcn, node, examiner, request.note, context)
        else:
            rejected = f"examiner {examiner} rejected the {node.upper()} match" + (
                f": {request.note}" if request.note else ""
            )
            # A rejected IDENT match notifies no one; a rejected IAFIS one leaves the level and
            # what the agency sees as they are (that history never counted). The agency hears of
            # the IAFIS verdict only, without the examiner's name or note.
            verdict = Verdict(
                rv.REJECT,
                (rejected,),
                bk.NOT_REQUIRED if node == "ident" else None,
                agency_reasons=("an examiner rejected the IAFIS candidate",) if node == "iafis" else (),
            )
        try:
            review, decision = await asyncio.to_thread(
                self.store.decide_review, tcn, node, examiner, verdict, request.note
            )
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no review {request.review_id}")
        except ReviewConflict as conflict:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(conflict))
        if verdict.notification is not None:
            self.coordinator.outbox.wake()
        if decision is not None:
            self.coordinator.feed.publish(decision)
        log.info(
            "review decided", tcn=tcn, node=node, examiner=examiner, verdict=rv.Verdict.Name(request.verdict)
        )
        return review

    async def _confirmation(
        self, tcn: str, node: str, examiner: str, note: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Verdict:
        """What a confirmation does, by the policy, to the now established identity (with the
        record the node gives for the candidate): see :meth:`_ident_confirmed` and
        :meth:`_iafis_confirmed`."""
        try:
            claimed = await asyncio.to_thread(self.store.held_review, tcn, node, examiner)
        except ReviewConflict as conflict:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(conflict))
        decision = await asyncio.to_thread(self.store.decision, tcn)
        if claimed is None or decision is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no review {tcn}/{node}")
        review, sealed = claimed
        try:
            booking = self.coordinator.open_booking(tcn, sealed)
        except SealingError:
            await context.abort(
                grpc.StatusCode.DATA_LOSS, f"the booking of review {tcn}/{node} does not open"
            )
        subject = await self._subject(review, examiner, booking, context)
        confirmed = (
            f"examiner {examiner} confirmed the {node.upper()} match {review.candidate.subject_id}"
            + (f": {note}" if note else "")
        )
        if node == "iafis":
            return self._iafis_confirmed(booking, decision, review, subject, confirmed)
        return self._ident_confirmed(booking, decision, review, subject, confirmed)

    def _ident_confirmed(
        self,
        booking: bk.Booking,
        decision: bk.BookingDecision,
        review: rv.Review,
        subject: gal.Subject,
        confirmed: str,
    ) -> Verdict:
        """The policy applied to the IDENT identity, and the ICE notice when the policy queues
        one: the booking, the stored decision's evidence and the candidate with its record."""
        outcome = self.coordinator.policy.ident_identity(
            decision.level, subject.immigration_history, [confirmed]
        )
        candidate = gal.Candidate(subject_id=review.candidate.subject_id)  # no record: ICE's alone
        if outcome.notification != bk.QUEUED:
            log.info("confirmed review not notified", tcn=booking.tcn, notification=outcome.notification)
            return Verdict(rv.CONFIRM, tuple(outcome.reasons), outcome.notification, confirmed=candidate)
        evidence = bk.BookingDecision()
        evidence.CopyFrom(decision)
        match = evidence.ident.candidates[0]
        match.CopyFrom(review.candidate)
        match.immigration_history.CopyFrom(subject.immigration_history)
        evidence.reasons.extend(outcome.reasons)
        notification = self.coordinator.notification(booking, evidence)
        return Verdict(rv.CONFIRM, tuple(outcome.reasons), bk.QUEUED, notification, confirmed=candidate)

    def _iafis_confirmed(
        self,
        booking: bk.Booking,
        decision: bk.BookingDecision,
        review: rv.Review,
        subject: gal.Subject,
        confirmed: str,
    ) -> Verdict:
        """The threat level of the booking's charges and the confirmed candidate's counted
        convictions, as for an automated IAFIS hit; the candidate's criminal history becomes
        part of what the agency sees. An ICE notice already sent keeps the level it was sent
        with, and the decision says so."""
        history = subject.criminal_history
        level, level_reasons = self.coordinator.policy.booking_level(booking.charges, history)
        reasons = [confirmed, *level_reasons]
        agency = (f"an examiner confirmed the IAFIS match {review.candidate.subject_id}", *level_reasons)
        if level != decision.level and decision.notification in (bk.QUEUED, bk.DELIVERED, bk.UNDELIVERABLE):
            reasons.append(
                f"the ICE notice went out at {rec.ThreatLevel.Name(decision.level)}, before this confirmation"
            )
        candidate = gal.Candidate(subject_id=review.candidate.subject_id, criminal_history=history)
        return Verdict(rv.CONFIRM, tuple(reasons), level=level, confirmed=candidate, agency_reasons=agency)
