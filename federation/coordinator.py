"""The federation coordinator: ``fedprint.booking.v1.BookingService``.

For each booking it searches IAFIS and IDENT at the same time, each under its own
deadline; applies the threat policy; stores the decision, its audit entry and any
ICE notification in one transaction; and answers within the caller's deadline.
A node that does not answer makes the decision INCOMPLETE, never a no-hit: the
coordinator keeps the booking sealed, searches the nodes that did not answer again
with backoff, and publishes the final decision on ``WatchDecisions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from prometheus_client import Counter

from federation.background import DueWorkLoop, backoff_s
from federation.checkpoint import write_checkpoint
from federation.config import CoordinatorConfig
from federation.disclosure import agency_view, kept_view
from federation.intake import booking_content, changed_parts, check_booking_header, check_booking_tenprint
from federation.metrics import CoordinatorStatsCollector
from federation.outbox import CLAIM_SLACK_S, OutboxDeliverer
from federation.policy import ThreatPolicy
from federation.review import ReviewServicer, opened_reviews
from federation.sealing import BookingSeal, SealingError, load_or_create_key
from federation.store import CoordinatorStore, PendingBooking
from federation.trust import NodeTrust, distrust
from fedprint.access import AccessPolicy, Denial, TokenBuckets, current_caller, deny
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.booking.v1 import booking_pb2 as bk
from fedprint.booking.v1 import booking_pb2_grpc as bk_grpc
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.ice.v1 import ice_pb2 as ice
from fedprint.ice.v1 import ice_pb2_grpc as ice_grpc
from fedprint.private import private_directory
from fedprint.review.v1 import review_pb2 as rv
from fedprint.review.v1 import review_pb2_grpc as rv_grpc
from fedprint.rpc import InvalidRequest, ServiceHost, abort_invalid, open_channel, service
from fedprint.validation import ORI, TCN, Violations, booking_key, booking_of

log = structlog.get_logger(__name__)

#: Due incomplete bookings one retry pass claims (each is searched under the node deadline).
RETRY_CLAIM_BATCH = 4

_OUTCOME_OF_CODE = {
    grpc.StatusCode.DEADLINE_EXCEEDED: bk.TIMED_OUT,
    grpc.StatusCode.UNAVAILABLE: bk.UNAVAILABLE,
}


@dataclass(frozen=True)
class NodeClient:
    """A gallery node the coordinator searches, and what its answers must show."""

    name: str
    stub: gal_grpc.GalleryServiceAsyncStub
    trust: NodeTrust = field(default_factory=NodeTrust)


class DecisionFeed:
    """Fan-out of new decisions to WatchDecisions subscribers."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[bk.BookingDecision]] = set()

    def publish(self, decision: bk.BookingDecision) -> None:
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):  # a stalled watcher loses updates, not the service
                queue.put_nowait(decision)

    @contextlib.contextmanager
    def subscribe(self) -> Any:
        queue: asyncio.Queue[bk.BookingDecision] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)


class Coordinator(bk_grpc.BookingServiceServicer):
    """SubmitBooking, GetDecision and WatchDecisions."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: CoordinatorStore,
        policy: ThreatPolicy,
        iafis: NodeClient,
        ident: NodeClient,
        outbox: OutboxDeliverer,
        seal: BookingSeal,
    ) -> None:
        self.config = config
        self.store = store
        self.policy = policy
        self.iafis = iafis
        self.ident = ident
        self.outbox = outbox
        self.seal = seal
        self.feed = DecisionFeed()
        self.retrier = DueWorkLoop(
            "incomplete-bookings", self.retry_due, store.next_booking_due_at, idle_s=config.retry_max_s
        )
        #: Node answers refused by :mod:`federation.trust`, by node and reason (alert on any).
        self.untrusted_answers = Counter(
            "fedprint_coordinator_untrusted_node_answers",
            "gallery node answers not believed (another calibration, a gallery below the floor, "
            "another probe) and treated as no answer",
            ["node", "reason"],
            registry=None,
        )
        # One evaluation per TCN at a time: a resubmission waits for the first to finish.
        # Weak values: a lock disappears once no call holds or awaits it.
        self._tcn_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def _search(self, node: NodeClient, booking: bk.Booking, deadline_s: float) -> bk.NodeResult:
        started = time.perf_counter()
        request = gal.IdentifyRequest(
            probes=[gal.Probe(probe_id=booking.tcn, tenprint=booking.tenprint)],
            max_results=self.config.max_candidates,
        )
        result = bk.NodeResult(node=node.name)
        try:
            response = await node.stub.Identify(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as error:
            result.outcome = _OUTCOME_OF_CODE.get(error.code(), bk.FAILED)
            result.error = f"{error.code().name}: {error.details()}"
        else:
            refused = distrust(node.trust, response, booking.tcn)
            if refused is not None:
                reason, explanation = refused
                result.outcome = bk.UNTRUSTED
                result.error = explanation
                result.latency_ms = (time.perf_counter() - started) * 1000
                self.untrusted_answers.labels(node.name, reason).inc()
                log.error("node answer not believed", node=node.name, reason=reason, error=explanation)
                await asyncio.to_thread(
                    self.store.record_event,
                    booking_key(booking.ori, booking.tcn),
                    "node_answer_refused",
                    f"{node.name}: {explanation}",
                )
                return result
            probe = response.results[0]
            if probe.missing_shards:
                # A sharded node searched part of its gallery: as good as no answer (the subject
                # may be in the missing part), so the decision stays INCOMPLETE and is retried.
                result.outcome = bk.PARTIAL
                result.error = "; ".join(
                    f"shard {m.partition.index} of {m.partition.count} ({m.address}) "
                    f"did not answer: {m.error}"
                    for m in probe.missing_shards
                )
                result.latency_ms = (time.perf_counter() - started) * 1000
                return result
            result.outcome = bk.ANSWERED
            result.band = probe.decision
            # Never more than asked for, whatever a node sends.
            result.candidates.extend(probe.candidates[: self.config.max_candidates])
            result.thresholds.CopyFrom(probe.thresholds)
            result.unusable_fingers.extend(probe.unusable_fingers)
        result.latency_ms = (time.perf_counter() - started) * 1000
        return result

    def open_booking(self, key: str, sealed: bytes) -> bk.Booking:
        """A booking the coordinator keeps sealed (incomplete, or under examiner review), by its
        key (ORI/TCN). It was sealed under its TCN, as before bookings were keyed by ORI too."""
        return bk.Booking.FromString(self.seal.open(booking_of(key)[1], sealed))

    def notification(self, booking: bk.Booking, decision: bk.BookingDecision) -> ice.Notification:
        """The ICE notification of an IDENT hit: ``decision`` is the full evidence (with the
        immigration record of its first IDENT candidate)."""
        notification = ice.Notification(
            tcn=booking.tcn,
            ori=booking.ori,
            booking_time=booking.booking_time,
            level=decision.level,
            charges=booking.charges,
            ident_match=decision.ident.candidates[0],
            hit_threshold=decision.ident.thresholds.hit,
            policy_version=decision.policy_version,
            reasons=decision.reasons,
        )
        if decision.iafis.band == bio.HIT and decision.iafis.candidates:
            notification.iafis_match.CopyFrom(decision.iafis.candidates[0])
        return notification

    async def _result(
        self, node: NodeClient, booking: bk.Booking, deadline_s: float, previous: bk.NodeResult | None
    ) -> bk.NodeResult:
        if previous is not None and previous.outcome == bk.ANSWERED:
            return previous  # that node answered an earlier attempt: search only the missing ones
        return await self._search(node, booking, deadline_s)

    async def decide(
        self, booking: bk.Booking, deadline_s: float, previous: bk.BookingDecision | None = None
    ) -> bk.BookingDecision:
        """Searches both nodes at once (only those that did not answer ``previous``, an earlier
        incomplete decision of this booking) and applies the policy (does not store)."""
        iafis, ident = await asyncio.gather(
            self._result(self.iafis, booking, deadline_s, previous.iafis if previous else None),
            self._result(self.ident, booking, deadline_s, previous.ident if previous else None),
        )
        outcome = self.policy.decide(booking.charges, iafis, ident)
        complete = iafis.outcome == bk.ANSWERED and ident.outcome == bk.ANSWERED
        decision = bk.BookingDecision(
            tcn=booking.tcn,
            ori=booking.ori,
            status=bk.COMPLETE if complete else bk.INCOMPLETE,
            iafis=iafis,
            ident=ident,
            level=outcome.level,
            reasons=outcome.reasons,
            agency_reasons=outcome.agency_reasons,
            policy_version=self.policy.version,
            notification=outcome.notification,
        )
        decision.decided_at.GetCurrentTime()
        return decision

    async def audit_denial(self, denial: Denial) -> None:
        """Keeps a refused call in the audit trail (the booking's TCN when the call named one)."""
        detail = "; ".join(f"{k}={v}" for k, v in denial.fields().items() if k != "tcn" and v)
        await asyncio.to_thread(self.store.record_event, denial.tcn, "access_denied", detail)

    async def SubmitBooking(
        self, request: bk.Booking, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bk.BookingDecision:
        try:
            check_booking_header(request)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        # The ORI is the certificate's: a booking claiming another agency's is refused before its
        # ten-print is decoded.
        caller = current_caller()
        if not caller.acts_for(request.ori):
            await deny(
                context,
                f"the certificate is for ORI {caller.identity.ori if caller.identity else ''}, "
                f"the booking claims {request.ori}",
                tcn=request.tcn,
            )
        if self.config.authorized_oris and request.ori not in self.config.authorized_oris:
            await deny(context, f"ORI {request.ori} is not authorised to submit bookings", tcn=request.tcn)
        try:
            check_booking_tenprint(request)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        async with self._lock(booking_key(request.ori, request.tcn)):
            return await self._submit(request, context)

    def _lock(self, key: str) -> asyncio.Lock:
        """The lock one booking's attempts take in turn (a submission and a retry of it)."""
        lock = self._tcn_locks.get(key)
        if lock is None:
            lock = self._tcn_locks[key] = asyncio.Lock()
        return lock

    async def _submit(
        self, booking: bk.Booking, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bk.BookingDecision:
        # The agency's own booking of this TCN, if any: another agency's is another booking.
        key = booking_key(booking.ori, booking.tcn)
        previous = await asyncio.to_thread(self.store.decision, key)
        if previous is not None:
            stored = await asyncio.to_thread(self.store.booking_content, key)
            changed = changed_parts(stored or "", booking)
            if changed:
                log.warning("resubmission differs", tcn=booking.tcn, ori=booking.ori, parts=changed)
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"TCN {booking.tcn} was already submitted with a different {', '.join(changed)}; "
                    "a new booking needs a new TCN",
                )
            if previous.status == bk.COMPLETE:
                log.info("booking already decided", tcn=booking.tcn)
                return agency_view(previous)
        timeout = self.config.node_deadline_s
        remaining = context.time_remaining()
        if remaining is not None:
            # Leave the caller time to receive the answer after both searches.
            timeout = max(0.1, min(timeout, remaining - 0.5))
        evidence = previous
        if previous is not None:
            kept = await asyncio.to_thread(self.store.sealed_booking, key)
            evidence = self._open_evidence(booking.tcn, kept, previous)
        return agency_view(await self._evaluate(booking, evidence, timeout))

    def _open_evidence(
        self, tcn: str, kept: PendingBooking | None, stored: bk.BookingDecision
    ) -> bk.BookingDecision:
        """The full evidence of an incomplete attempt (node results with the records the agency
        view drops), from its sealed copy; the stored decision when there is none to open."""
        if kept is None or not kept.sealed_evidence:
            return stored
        try:
            return bk.BookingDecision.FromString(self.seal.open(tcn, kept.sealed_evidence))
        except SealingError:
            log.error("sealed evidence does not open; searching every node again", tcn=tcn)
            return bk.BookingDecision(tcn=tcn, ori=stored.ori, attempt=stored.attempt)

    async def _evaluate(
        self, booking: bk.Booking, previous: bk.BookingDecision | None, deadline_s: float, retries: int = 0
    ) -> bk.BookingDecision:
        """Decides, stores and publishes one attempt. ``previous`` is the evidence of the last
        (incomplete) attempt: its answered searches are kept. While incomplete, the booking and
        the evidence stay sealed for the next retry, ``retries`` backoffs away. Returns the
        decision as kept (:func:`~federation.disclosure.kept_view`)."""
        evidence = await self.decide(booking, deadline_s, previous)
        evidence.attempt = (previous.attempt if previous is not None else 0) + 1
        # ICE gets the immigration record in the notification; the store and the audit log keep
        # the decision without it, and agencies see only their view of that (federation.disclosure).
        notification = self.notification(booking, evidence) if evidence.notification == bk.QUEUED else None
        decision = kept_view(evidence)
        sealed: tuple[bytes, bytes] | None = None
        retry_at: dt.datetime | None = None
        reviews: list[tuple[rv.Review, bytes]] = []
        if decision.status == bk.COMPLETE:
            # The examiner compares the booking's prints: they stay sealed until the verdict.
            reviews = [
                (opened, self.seal.seal(booking.tcn, booking.SerializeToString()))
                for opened in opened_reviews(evidence)
            ]
        if decision.status == bk.INCOMPLETE:
            sealed = (
                self.seal.seal(booking.tcn, booking.SerializeToString()),
                self.seal.seal(booking.tcn, evidence.SerializeToString()),
            )
            delay = backoff_s(retries, self.config.retry_initial_s, self.config.retry_max_s)
            retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        await asyncio.to_thread(
            self.store.record_decision,
            decision,
            notification,
            content=booking_content(booking),
            sealed=sealed,
            retry_at=retry_at,
            retries=retries,
            reviews=reviews,
        )
        if notification is not None:
            self.outbox.wake()
        if sealed is not None:
            self.retrier.wake()
        self.feed.publish(decision)
        log.info(
            "booking decided",
            tcn=decision.tcn,
            ori=decision.ori,
            status=bk.DecisionStatus.Name(decision.status),
            iafis=bio.DecisionBand.Name(decision.iafis.band),
            ident=bio.DecisionBand.Name(decision.ident.band),
            level=decision.level,
            notification=bk.NotificationState.Name(decision.notification),
            attempt=decision.attempt,
        )
        return decision

    async def retry_due(self) -> int:
        """Searches again, for each sealed incomplete booking that is due, the nodes that did not
        answer; returns how many bookings became final."""
        finished = 0
        # Claimed, so that another coordinator replica does not search the same booking at once;
        # the claim outlasts the pass (a deadline per booking) and ends with each new attempt.
        lease_s = self.config.node_deadline_s * RETRY_CLAIM_BATCH + CLAIM_SLACK_S
        claimed = await asyncio.to_thread(self.store.claim_due_bookings, lease_s, RETRY_CLAIM_BATCH)
        for pending in claimed:
            key, (ori, tcn) = pending.tcn, booking_of(pending.tcn)
            async with self._lock(key):
                previous = await asyncio.to_thread(self.store.decision, key)
                if previous is not None and previous.status == bk.COMPLETE:
                    continue  # a resubmission finished it meanwhile (and dropped the sealed copy)
                try:
                    booking = self.open_booking(key, pending.sealed)
                except SealingError:
                    log.error("sealed booking does not open; left for an operator", tcn=tcn, ori=ori)
                    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.config.retry_max_s)
                    await asyncio.to_thread(self.store.reschedule_booking, key, later)
                    continue
                evidence = self._open_evidence(tcn, pending, previous) if previous else None
                decision = await self._evaluate(
                    booking, evidence, self.config.node_deadline_s, retries=pending.retries + 1
                )
                if decision.status == bk.COMPLETE:
                    finished += 1
                else:
                    delay = backoff_s(
                        pending.retries + 1, self.config.retry_initial_s, self.config.retry_max_s
                    )
                    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
                    await asyncio.to_thread(self.store.reschedule_booking, key, later)
        return finished

    async def GetDecision(
        self, request: bk.GetDecisionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bk.BookingDecision:
        caller = current_caller()
        # A TCN is its agency's own: the booking looked up is the caller's, so another agency's
        # TCN is answered exactly as one that does not exist.
        own = caller.identity.ori if caller.identity is not None else None
        ori = request.ori or own or ""
        violations = Violations()
        TCN.check(request.tcn, "tcn", violations)
        if not ori:
            violations.add("ori", "the agency's ORI is required where no certificate names it")
        elif request.ori:
            ORI.check(request.ori, "ori", violations)
        if violations:
            await abort_invalid(context, InvalidRequest(violations, "malformed request"))
        if not caller.acts_for(ori):
            await deny(context, f"ORI {ori} is another agency's")
        decision = await asyncio.to_thread(self.store.decision, booking_key(ori, request.tcn))
        if decision is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no decision for TCN {request.tcn}")
        return agency_view(decision)

    async def GetStats(
        self, request: bk.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bk.CoordinatorStats:
        return await asyncio.to_thread(self.store.stats, self.config.review_overdue_s)

    async def WatchDecisions(
        self, request: bk.WatchDecisionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bk.BookingDecision]:
        caller = current_caller()
        if request.ori:
            violations = Violations()
            if not ORI.check(request.ori, "ori", violations):
                await abort_invalid(context, InvalidRequest(violations, "malformed request"))
        if caller.identity is not None and not request.ori:
            await deny(context, "an agency watches its own ORI's decisions: set ori")
        if not caller.acts_for(request.ori):
            await deny(context, f"ORI {request.ori} is another agency's")
        with self.feed.subscribe() as queue:
            # Headers go out once the watch is registered: a client that has read them misses
            # no decision made after that moment.
            await context.send_initial_metadata(())
            while True:
                decision = await queue.get()
                if not request.ori or decision.ori == request.ori:
                    yield agency_view(decision)


@dataclass
class CoordinatorService:
    """A running coordinator: its host, the outbox task, and the channels to close."""

    host: ServiceHost
    coordinator: Coordinator
    channels: list[grpc.aio.Channel]
    _checkpoints: asyncio.Task[None] | None = None

    async def start(self) -> int:
        port = await self.host.start()
        # Before this life claims anything: whatever this replica's name holds is its dead life's.
        freed = await asyncio.to_thread(self.coordinator.store.release_own_claims)
        if freed:
            log.warning("claims of a previous run released", rows=freed)
        self.coordinator.outbox.start()
        self.coordinator.retrier.start()
        if self.coordinator.config.audit_checkpoint_dir is not None:
            self._checkpoints = asyncio.create_task(self._checkpoint_regularly())
        return port

    async def checkpoint(self) -> None:
        """Writes a signed checkpoint of the audit log (:mod:`federation.checkpoint`)."""
        directory = self.coordinator.config.audit_checkpoint_dir
        key = self.coordinator.store.audit_key
        if directory is None or key is None:
            return
        entries, head = await asyncio.to_thread(self.coordinator.store.audit_head)
        await asyncio.to_thread(write_checkpoint, directory, key, entries, head)

    async def _checkpoint_regularly(self) -> None:
        while True:
            try:
                await self.checkpoint()
            except OSError as error:  # a full or missing volume: say so loudly, keep deciding
                log.error("audit checkpoint not written", error=str(error))
            await asyncio.sleep(self.coordinator.config.audit_checkpoint_interval_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.host.stop(grace_s)
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            with contextlib.suppress(OSError):
                await self.checkpoint()  # the log as this life leaves it
        await self.coordinator.retrier.stop()
        await self.coordinator.outbox.stop()
        for channel in self.channels:
            await channel.close(None)
        self.coordinator.store.close()


def build_coordinator(config: CoordinatorConfig, database_url: str | None = None) -> CoordinatorService:
    """Wires store, policy, node clients and outbox into a coordinator server (not yet started)."""
    private_directory(config.data_dir)
    store = CoordinatorStore(
        database_url or f"sqlite:///{config.data_dir / 'coordinator.sqlite'}",
        replica_id=config.replica_id,
        audit_key=load_or_create_key(config.audit_key_path(), "audit key"),
    )
    if not store.audit_key_fits():
        raise ValueError(
            f"{config.audit_key_path()} is not the key the audit log was chained with: restore the "
            "log's key (appending under another would leave a log no key verifies)"
        )
    policy = ThreatPolicy.load(config.policy_path)
    channels = [
        # No gRPC retries: a node that did not answer makes the decision incomplete, and the
        # coordinator retries the booking and the notice itself, durably.
        # Each address must answer with its own service's certificate (open_channel's server).
        open_channel(a, config.tls, server=name, insecure=config.insecure, retries=False)
        for name, a in (
            ("iafis", config.iafis_address),
            ("ident", config.ident_address),
            ("ice", config.ice_address),
        )
    ]
    outbox = OutboxDeliverer(
        store,
        ice_grpc.IceNotificationServiceStub(channels[2]),
        deadline_s=config.ice_deadline_s,
        retry_initial_s=config.outbox_retry_initial_s,
        retry_max_s=config.outbox_retry_max_s,
        max_attempts=config.outbox_max_attempts,
        dead_letter_retention_s=config.outbox_dead_letter_retention_s,
    )
    seal = BookingSeal(load_or_create_key(config.booking_key_file or config.data_dir / "booking.key"))
    coordinator = Coordinator(
        config,
        store,
        policy,
        NodeClient("iafis", gal_grpc.GalleryServiceStub(channels[0]), config.iafis_trust),
        NodeClient("ident", gal_grpc.GalleryServiceStub(channels[1]), config.ident_trust),
        outbox,
        seal,
    )
    host = ServiceHost(
        config.listen,
        [
            service(
                bk.DESCRIPTOR.services_by_name["BookingService"],
                bk_grpc.add_BookingServiceServicer_to_server,
                coordinator,
            ),
            service(
                rv.DESCRIPTOR.services_by_name["ReviewService"],
                rv_grpc.add_ReviewServiceServicer_to_server,
                ReviewServicer(coordinator),
            ),
        ],
        config.tls,
        insecure=config.insecure,
        access=AccessPolicy(
            rate_limit=(
                TokenBuckets(config.rate_limit.per_second, config.rate_limit.burst)
                if config.rate_limit is not None
                else None
            ),
            audit=coordinator.audit_denial,
        ),
        denials=config.refusals.ledger(),
        metrics_listen=config.metrics_listen,
        health_listen=config.health_listen,
    )
    host.metrics.registry.register(CoordinatorStatsCollector(store, config.review_overdue_s))
    host.metrics.registry.register(coordinator.untrusted_answers)
    return CoordinatorService(host, coordinator, channels)
