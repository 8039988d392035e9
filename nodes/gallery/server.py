"""The gallery service both nodes run: ``fedprint.gallery.v1.GalleryService``.

A node is this server plus its :class:`~nodes.gallery.records.RecordStore`
(IAFIS: criminal histories, IDENT: immigration histories). The same server holds the whole
gallery (role ``standalone``) or one partition of it (role ``shard``, behind a router:
:mod:`nodes.gallery.router`). A shard answers its own node's router only (the caller presents the
node's own certificate), and gallery administrators may read its statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic

import grpc
import structlog
import torch

from calibration.thresholds import calibration_digest
from fedprint.access import AccessPolicy, current_caller, deny, table_without
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import Role, identity_of
from fedprint.private import private_directory
from fedprint.rpc import InvalidRequest, ServiceHost, abort_invalid, exhausted_status, service
from fedprint.tenprint import DecodedTenPrint, decode_tenprint
from fedprint.validation import Violations
from gpu_kernels import TenPrintCylinders
from gpu_kernels.evidence import model_digest
from minutiae.template import TenPrintTemplates
from nodes.gallery.batcher import MicroBatcher, QueueFull
from nodes.gallery.config import NodeConfig
from nodes.gallery.gallery import TEMPLATE_FORMAT_VERSION, Gallery, Match, SearchResult, resolve_device
from nodes.gallery.learner import CalibrationLearner
from nodes.gallery.metrics import GalleryMetrics
from nodes.gallery.partition import Partition
from nodes.gallery.records import RecordStore, RecordT
from nodes.gallery.releases import ReleaseLedger, caller_name
from nodes.gallery.replica import GalleryReplica, LoadedGallery
from nodes.gallery.requests import (
    MAX_ENROLL_PER_STREAM,
    IdentifyPlan,
    check_enrollment,
    check_get_subject,
    check_identify,
    check_remove,
    rank_candidates,
    thresholds_proto,
    usable_templates,
    with_memory_totals,
)
from nodes.gallery.store import Enrollment, GalleryStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _SearchItem:
    tenprint: TenPrintTemplates
    k: int


class GalleryServicer(gal_grpc.GalleryServiceServicer, Generic[RecordT]):
    """Identify, Enroll, Remove and GetStats over one node's store and in-memory gallery (the whole
    gallery, or a shard's partition of it)."""

    def __init__(
        self,
        config: NodeConfig,
        store: GalleryStore[RecordT],
        gallery: Gallery,
        replica: GalleryReplica | None = None,
    ) -> None:
        self.config = config
        self.node = config.node
        fitted_on, in_use = config.thresholds.evidence_model, model_digest()
        if fitted_on is not None and fitted_on != in_use:
            raise ValueError(
                f"the {self.node} node's thresholds were fitted on evidence model {fitted_on}, and it "
                f"scores with {in_use}: recalibrate (fedprint eval --calibrate) or restore the model"
            )
        #: What callers may pin: the calibration (and the evidence model it names) it judges by.
        self.calibration_digest = calibration_digest(config.thresholds)
        self.store = store
        self.gallery = gallery
        self.replica = replica or GalleryReplica(store, gallery, config.partition)
        policy = config.learning
        if config.role != "standalone":  # a shard sees a partition only; see NodeConfig.learning
            policy = policy.model_copy(update={"enabled": False})
        #: The thresholds the node judges by: the configured ones, or those learned from its gallery.
        self.learner = CalibrationLearner(gallery, store, config.thresholds, policy)
        #: A shard's partition; None for a node that holds its whole gallery.
        self.partition: Partition | None = config.partition if config.role == "shard" else None
        # Who a shard answers: its router, which presents the node's own certificate.
        self._node_subject = (
            identity_of(config.tls.cert.read_bytes()).subject if config.tls is not None else None
        )
        self.batcher: MicroBatcher[_SearchItem, SearchResult] = MicroBatcher(
            self._search_batch,
            max_batch=config.batching.max_batch,
            max_wait_s=config.batching.max_wait_ms / 1000,
            max_queue=config.batching.max_queue,
        )
        #: Set once the node's host exists (:func:`build_gallery_node`).
        self.metrics: GalleryMetrics | None = None
        #: What this node returned to whom, and so may release (a shard's router keeps its own).
        self.releases = ReleaseLedger(store, self.node, config.release_window_s, config.release_max_records)

    @property
    def records(self) -> RecordStore[RecordT]:
        return self.store.records

    def _partition_proto(self) -> gal.GalleryPartition | None:
        if self.partition is None:
            return None
        return gal.GalleryPartition(index=self.partition.index, count=self.partition.count)

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], *, admin_may: bool) -> None:
        """The gallery-node role is a router's: only a shard serves it, and only its own node's.
        A shard serves nobody else, except gallery administrators reading statistics
        (``admin_may``): searching or changing one partition alone would look complete."""
        identity = current_caller().identity
        if identity is None:  # plaintext (insecure) server: no identities to check
            return
        if self.partition is None:
            if identity.role is Role.GALLERY_NODE:
                await deny(context, f"the {self.node} node is not a shard; gallery nodes call shards only")
            return
        if identity.role is Role.GALLERY_NODE and identity.subject == self._node_subject:
            return
        if admin_may and identity.role is Role.GALLERY_ADMIN:
            return
        await deny(context, f"a shard of the {self.node} node answers the node's own router only")

    # -- Identify ---------------------------------------------------------------------------

    def _search_batch(self, items: Sequence[_SearchItem]) -> list[SearchResult]:
        """One device call for every probe gathered by the batcher (runs in a worker thread)."""
        probes = self.gallery.encode([item.tenprint for item in items])
        results = self.gallery.search(probes, max(item.k for item in items))
        return [
            SearchResult(r.matches[: item.k], r.searched, r.fully_scored)
            for r, item in zip(results, items, strict=True)
        ]

    def _search_subset(
        self, tenprints: Sequence[TenPrintTemplates], k: int, subset: Sequence[str]
    ) -> list[SearchResult]:
        probes: TenPrintCylinders = self.gallery.encode(tenprints)
        return self.gallery.search(probes, k, subset)

    async def Identify(
        self, request: gal.IdentifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.IdentifyResponse:
        started = time.perf_counter()
        await self._admit(context, admin_may=False)
        try:
            plan = check_identify(request, self.config, self.learner.current)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        decoded, k = plan.probes, plan.k
        # The whole gallery's size also for a subset search: never a lower threshold for a few.
        size = len(self.gallery)
        if request.subject_ids:
            results = await asyncio.to_thread(
                self._search_subset, [d.templates for d in decoded], k, list(request.subject_ids)
            )
        else:
            try:
                results = await self.batcher.submit_all([_SearchItem(d.templates, k) for d in decoded])
            except QueueFull as full:
                log.warning("identify refused: batch queue full", node=self.node, queued=full.queued)
                await context.abort_with_status(  # type: ignore[attr-defined]
                    exhausted_status(
                        f"the {self.node} node's search queue is full ({full.queued} of {full.limit} "
                        f"probes waiting; this call has {full.wanted}); retry after the delay given",
                        subject=f"node:{self.node}",
                        description="batching.max_queue probes waiting to be searched",
                        retry_after_s=full.retry_after_s,
                    )
                )
        if not request.subject_ids:  # a search of the whole gallery is traffic to learn from
            self.learner.observe(results, [len(d.templates.fingers) for d in decoded], k)
        judged = [
            [self._candidate(m, d, plan, size) for m in r.matches]
            for r, d in zip(results, decoded, strict=True)
        ]
        # Minimal disclosure: a record goes out only with a HIT candidate. Review-band and no-hit
        # candidates carry their subject id and scores, nothing about the person.
        hit_ids = sorted({c.subject_id for cs in judged for c in cs if c.band == bio.HIT})
        records = await asyncio.to_thread(self.store.get_records, hit_ids) if hit_ids else {}
        response = gal.IdentifyResponse(
            node=self.node,
            partition=self._partition_proto(),
            calibration_digest=self.calibration_digest,
            gallery_size=size,
        )
        for i, (probe, d, searched, candidates) in enumerate(
            zip(request.probes, decoded, results, judged, strict=True)
        ):
            result = response.results.add(
                probe_id=probe.probe_id,
                thresholds=thresholds_proto(plan.probe_thresholds(i, size)),
                unusable_fingers=[issue.to_proto() for issue in d.issues],
                searched_subjects=searched.searched,
                fully_scored_subjects=searched.fully_scored,
            )
            for candidate in candidates:
                record = records.get(candidate.subject_id) if candidate.band == bio.HIT else None
                if record is not None:
                    getattr(candidate, self.records.record_field).CopyFrom(record)
            rank_candidates(result, candidates, plan.k)
        log.info(
            "identify",
            node=self.node,
            partition=str(self.partition) if self.partition is not None else None,
            probes=[p.probe_id for p in request.probes],
            decisions=[bio.DecisionBand.Name(r.decision) for r in response.results],
            top_scores=[
                round(r.candidates[0].fused_score, 4) if r.candidates else None for r in response.results
            ],
            searched=[r.searched for r in results],
            fully_scored=[r.fully_scored for r in results],
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if self.partition is None:  # a shard's caller is its router, which keeps the record
            await asyncio.to_thread(self.releases.returned, caller_name(), response)
        if self.metrics is not None:
            self.metrics.observe_identify(response)
        return response

    @staticmethod
    def _candidate(match: Match, probe: DecodedTenPrint, plan: IdentifyPlan, size: int) -> gal.Candidate:
        """A candidate with its per-finger scores and evidence, judged by the plan's thresholds."""
        candidate = gal.Candidate(subject_id=match.subject_id, fused_score=match.fused)
        for position, score in sorted(match.finger_scores.items()):
            candidate.finger_scores.add(
                position=bio.FingerPosition.ValueType(position),
                score=score,
                probe_minutiae=probe.templates.fingers[position].count,
                candidate_minutiae=match.candidate_minutiae.get(position, 0),
                llr=match.finger_llr.get(position, 0.0),
            )
        plan.judge(candidate, size)
        return candidate

    # -- Enroll / Remove / GetStats -------------------------------------------------------------

    async def Enroll(
        self, request_iterator: AsyncIterator[gal.EnrollRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.EnrollResponse:
        await self._admit(context, admin_may=False)
        enrollments: list[Enrollment[RecordT]] = []
        tenprints: list[TenPrintTemplates] = []
        violations = Violations()
        seen: set[str] = set()
        i = -1
        async for request in request_iterator:
            i += 1
            if i >= MAX_ENROLL_PER_STREAM:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"an Enroll stream carries at most {MAX_ENROLL_PER_STREAM} subjects; split it",
                )
            where = f"requests[{i}]"
            found = check_enrollment(request, where, seen, self.records, self.node, self.partition)
            if found:
                violations.extend(found)
                continue
            try:
                decoded = decode_tenprint(request.tenprint, f"{where}.tenprint")
            except InvalidRequest as error:
                violations.extend(error.violations)
                continue
            record: RecordT = getattr(request, self.records.record_field)
            if not record.subject_id:  # type: ignore[attr-defined]
                record.subject_id = request.subject_id  # type: ignore[attr-defined]
            enrollments.append(Enrollment(request.subject_id, usable_templates(request, decoded), record))
            tenprints.append(decoded.templates)
        if violations:
            await abort_invalid(
                context, InvalidRequest(violations, "enrollment rejected; nothing was stored")
            )
        if not enrollments:
            return gal.EnrollResponse(enrolled=0, gallery_size=len(self.gallery))
        # Encode before storing: if encoding fails, nothing has been written.
        cylinders = await asyncio.to_thread(self.gallery.encode, tenprints)
        await asyncio.to_thread(self.replica.enroll, enrollments, cylinders)
        log.info("enrolled", node=self.node, subjects=len(enrollments), gallery_size=len(self.gallery))
        return gal.EnrollResponse(enrolled=len(enrollments), gallery_size=len(self.gallery))

    async def Remove(
        self, request: gal.RemoveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.RemoveResponse:
        await self._admit(context, admin_may=False)
        try:
            check_remove(request, self.partition)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        ids = list(request.subject_ids)
        removed = await asyncio.to_thread(self.replica.remove, ids)
        log.info("removed", node=self.node, subjects=removed, gallery_size=len(self.gallery))
        return gal.RemoveResponse(removed=removed, gallery_size=len(self.gallery))

    async def GetSubject(
        self, request: gal.GetSubjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.Subject:
        await self._admit(context, admin_may=False)
        try:
            check_get_subject(request)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        caller = caller_name()
        # Need to know (nodes.gallery.releases), asked before the store: a refusal says nothing of
        # whether the subject exists. A shard's router has asked already.
        if self.partition is None and not await asyncio.to_thread(self.releases.may_release, caller, request):
            await deny(context, self.releases.refusal(), tcn=request.probe_id)
        found = await asyncio.to_thread(self.store.subject, request.subject_id)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"subject {request.subject_id} is not enrolled")
        templates, record = found
        subject = gal.Subject(subject_id=request.subject_id)
        for position, (fmt, data) in templates.items():
            subject.tenprint.fingers.add(
                position=bio.FingerPosition.ValueType(position),
                template=bio.FingerTemplate(format=bio.TemplateFormat.ValueType(fmt), data=data),
            )
        if record is not None:
            getattr(subject, self.records.record_field).CopyFrom(record)
        if self.partition is None:
            await asyncio.to_thread(self.releases.released, caller, request)  # recorded, then given
        else:
            log.info("subject given to the router", node=self.node, subject_id=request.subject_id)
        return subject

    async def GetStats(
        self, request: gal.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.GalleryStats:
        await self._admit(context, admin_may=True)
        memory = self.gallery.memory()
        stats = gal.GalleryStats(
            node=self.node,
            gallery_size=memory.subjects,
            finger_count=self.gallery.finger_count,
            template_format_version=TEMPLATE_FORMAT_VERSION,
            device=str(self.gallery.device),
            thresholds=thresholds_proto(self.learner.current.for_gallery(memory.subjects)),
            partition=self._partition_proto(),
            memory=[
                gal.GalleryMemory(
                    part=m.part, location=m.location, bytes=m.bytes, reserved_bytes=m.reserved_bytes
                )
                for m in memory.parts
            ],
        )
        return with_memory_totals(stats)


@dataclass
class GalleryNode:
    """A running node (or shard): its gRPC host, the task that keeps its gallery in step with
    the store, and what to close on shutdown."""

    host: ServiceHost
    servicer: GalleryServicer[Any]
    loaded: LoadedGallery
    #: The encoded-gallery cache directory, or None when the node keeps none.
    cache: Path | None = None
    _sync: asyncio.Task[None] | None = field(default=None, repr=False)
    _learn: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> int:
        """Starts serving, catching up with other processes' writes and (a standalone node with
        learning on) learning its thresholds from its gallery; returns the bound port."""
        port = await self.host.start()
        loop = asyncio.get_running_loop()
        self._sync = loop.create_task(self._keep_in_step(), name="gallery-sync")
        if self.servicer.learner.active:
            self._learn = loop.create_task(self._keep_learning(), name="calibration-learning")
        return port

    async def _keep_learning(self) -> None:
        learner = self.servicer.learner
        while True:
            await asyncio.sleep(learner.policy.interval_s)
            try:
                done = await asyncio.to_thread(learner.learn)
            except Exception:  # a failed pass must not end learning for good
                log.exception("calibration learning failed", node=self.servicer.node)
                continue
            if self.servicer.metrics is not None:
                self.servicer.metrics.observe_learning(done)

    async def _keep_in_step(self) -> None:
        replica = self.servicer.replica
        while True:
            await asyncio.sleep(self.servicer.config.sync_interval_s)
            try:
                await asyncio.to_thread(replica.sync)
            except Exception:  # a database hiccup must not end the task for good
                log.exception("gallery sync failed", node=self.servicer.node)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops serving after the calls in flight; refreshes the gallery cache if the gallery
        changed since it was written (a crash skips this: the next start-up maps the older cache
        and catches up from the store)."""
        await self.host.stop(grace_s)
        self.servicer.learner.stop()
        for task in (self._sync, self._learn):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.servicer.batcher.close()
        replica = self.servicer.replica
        if replica.cache is not None:
            with contextlib.suppress(Exception):  # the store may be gone; the cache stays as it was
                await asyncio.to_thread(replica.sync)
            await asyncio.to_thread(replica.save_cache)
        self.servicer.store.close()


def build_gallery_node(
    config: NodeConfig, records: RecordStore[Any], database_url: str | None = None
) -> GalleryNode:
    """Opens the node's store with its record model, loads its gallery (or its shard's partition)
    onto the device, and prepares the server. Each node package supplies ``records``; this server
    knows none by name."""
    if config.role == "router":
        raise ValueError("a router holds no gallery: build it with nodes.gallery.router.build_gallery_router")
    private_directory(config.data_dir)
    if config.torch_threads is not None:
        # Nodes sharing a machine must not each spin up one thread per core.
        torch.set_num_threads(config.torch_threads)
    url = database_url or f"sqlite:///{config.data_dir / (config.node + '.sqlite')}"
    store = GalleryStore(url, records)
    gallery = Gallery(resolve_device(config.device), shortlist=config.shortlist)
    cache = config.data_dir / config.cache_name if config.gallery_cache else None
    replica = GalleryReplica(store, gallery, config.partition, cache)
    started = time.perf_counter()
    loaded = replica.load()
    log.info(
        "gallery loaded",
        node=config.node,
        role=config.role,
        partition=str(config.partition),
        subjects=loaded.subjects,
        from_cache=loaded.from_cache,
        caught_up=loaded.caught_up,
        s=round(time.perf_counter() - started, 2),
        device=str(gallery.device),
        bytes=gallery.nbytes,
    )
    servicer: GalleryServicer[Any] = GalleryServicer(config, store, gallery, replica)
    host = ServiceHost(
        config.listen,
        [
            service(
                gal.DESCRIPTOR.services_by_name["GalleryService"],
                gal_grpc.add_GalleryServiceServicer_to_server,
                servicer,
            )
        ],
        config.tls,
        insecure=config.insecure,
        # Only a shard answers the gallery-node role (its router's); a whole node refuses it before
        # anything is decoded.
        access=None if config.role == "shard" else AccessPolicy(table=table_without(Role.GALLERY_NODE)),
        denials=config.refusals.ledger(),
        metrics_listen=config.metrics_listen,
        health_listen=config.health_listen,
    )
    servicer.metrics = GalleryMetrics(host.metrics.registry, servicer)
    return GalleryNode(host, servicer, loaded, cache)
