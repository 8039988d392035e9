"""A sharded node's router: ``fedprint.gallery.v1.GalleryService`` in front of the node's shards.

The router holds no data. Each shard holds one partition of the node's gallery
(:mod:`nodes.gallery.partition`); ``shards`` lists their addresses in partition order, and each
address may resolve to several replicas of its partition, over which calls are spread
(round robin). For its caller the router is the node:

- ``Identify``: the request is checked once here, then sent to every shard at once under the
  caller's deadline (less a margin to merge and answer); the shards' candidates are merged into
  one top-k, ranked and banded by the thresholds of the whole gallery (the router's own, which
  every shard's answer must match). A shard that does not answer in time, cannot be reached,
  fails, or answers for another partition than the one it was asked for (a shard still on the
  old count while the count changes) is named in each probe's ``missing_shards``: the answer is
  partial, and the coordinator treats the node as not having answered. When no shard answers
  the call fails UNAVAILABLE, naming them.
- ``Enroll``: the stream is checked whole here (nothing is sent if any message is bad), then
  each subject goes to the shard that owns it. Each shard stores its part in one transaction;
  if a shard fails, the others' parts stay stored and the call fails naming the shard. An
  enrolment replaces, so sending the same stream again is safe.
- ``Remove``: each id to the shard that owns it. ``GetStats``: the shards' sums.
- ``GetSubject``: to the shard that owns the subject, once the router's own record says its caller
  was given that subject for that probe (:mod:`nodes.gallery.releases`). The router keeps that
  record, in the node's database: it sees the merged candidates its caller gets.

The router calls its shards with the node's own certificate (role gallery-node), which is what
shards answer (:class:`nodes.gallery.server.GalleryServicer`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter

from calibration.thresholds import calibration_digest
from fedprint.access import AccessPolicy, current_caller, deny, table_without
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.pki import Role
from fedprint.private import private_directory
from fedprint.rpc import InvalidRequest, ServiceHost, abort_invalid, open_channel, service
from fedprint.tenprint import decode_tenprint
from fedprint.validation import Violations
from nodes.gallery.config import NodeConfig
from nodes.gallery.partition import Partition, by_owner, owner
from nodes.gallery.records import RecordStore
from nodes.gallery.releases import ReleaseLedger, caller_name
from nodes.gallery.requests import (
    MAX_ENROLL_PER_STREAM,
    IdentifyPlan,
    check_enrollment,
    check_get_subject,
    check_identify,
    check_remove,
    rank_candidates,
    thresholds_proto,
    with_memory_totals,
)
from nodes.gallery.store import GalleryStore

log = structlog.get_logger(__name__)

#: Share of the caller's remaining time kept back from the shards, to merge and answer...
MERGE_SHARE = 0.1
#: ...but never more than this many seconds.
MERGE_MARGIN_MAX_S = 0.5


@dataclass(frozen=True)
class ShardClient:
    """One partition of the node and the channel to the shard (replicas) holding it."""

    partition: Partition
    address: str
    stub: gal_grpc.GalleryServiceAsyncStub

    def describe(self) -> str:
        return f"shard {self.partition.index} of {self.partition.count} ({self.address})"


class ShardFailure(Exception):
    """A shard's call failed; the message names the shard."""

    def __init__(self, shard: ShardClient, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{shard.describe()}: {code.name}: {details}")
        self.shard = shard
        self.code = code


def _same_calibration(a: bio.Thresholds, b: bio.Thresholds) -> bool:
    """Whether a shard judges by the router's calibration. Thresholds that follow the gallery
    size differ between a shard and the whole node by design; their calibration must not."""
    if a.gallery_size or b.gallery_size:
        return a.source == b.source and a.hit_fpir == b.hit_fpir and a.review_fpir == b.review_fpir
    return math.isclose(a.hit, b.hit, rel_tol=1e-9, abs_tol=1e-12) and math.isclose(
        a.review, b.review, rel_tol=1e-9, abs_tol=1e-12
    )


class GalleryRouter(gal_grpc.GalleryServiceServicer):
    """The node's GalleryService, answered by scattering to its shards and merging."""

    def __init__(
        self,
        config: NodeConfig,
        records: RecordStore[Any],
        shards: Sequence[ShardClient],
        releases: ReleaseLedger,
    ) -> None:
        self.config = config
        self.node = config.node
        self.calibration_digest = calibration_digest(config.thresholds)
        self.records = records
        self.shards = list(shards)
        #: What the router returned to whom, and so may release (in the node's database).
        self.releases = releases
        self._missing: Counter | None = None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Adds the router's own metric to its host's registry."""
        self._missing = Counter(
            "fedprint_router_missing_shards_total",
            "searches a shard took no part in (no answer, an error, or the wrong partition)",
            ["node", "shard"],
            registry=registry,
        )

    async def _refuse_gallery_nodes(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        identity = current_caller().identity
        if identity is not None and identity.role is Role.GALLERY_NODE:
            await deny(context, f"the {self.node} router is not a shard; gallery nodes call shards only")

    @staticmethod
    def _budget(context: grpc.aio.ServicerContext[Any, Any], default_s: float) -> float:
        """The shards' deadline: the caller's remaining time less a margin to merge and answer."""
        remaining = context.time_remaining()
        if remaining is None:
            return default_s
        return max(0.05, remaining - min(MERGE_MARGIN_MAX_S, MERGE_SHARE * remaining))

    # -- Identify -------------------------------------------------------------------------------

    async def _search(
        self, shard: ShardClient, request: gal.IdentifyRequest, plan: IdentifyPlan, timeout_s: float
    ) -> gal.IdentifyResponse | gal.MissingShard:
        """The shard's answer, or why it is missing."""
        missing = gal.MissingShard(
            partition=gal.GalleryPartition(index=shard.partition.index, count=shard.partition.count),
            address=shard.address,
        )
        try:
            response = await shard.stub.Identify(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            missing.error = f"{error.code().name}: {error.details()}"
            return missing
        answered = Partition(response.partition.index, response.partition.count)
        expected_ids = [p.probe_id for p in request.probes]
        if not response.HasField("partition") or answered != shard.partition:
            missing.error = (
                f"answered for partition {answered.index} of {answered.count}, not {shard.partition}"
                if response.HasField("partition")
                else "answered as a whole gallery, not as a shard"
            )
        elif [r.probe_id for r in response.results] != expected_ids:
            missing.error = "answered for other probes than it was asked"
        elif response.calibration_digest != self.calibration_digest:
            missing.error = (
                f"judges by another calibration ({response.calibration_digest or 'none named'}) than "
                f"the node ({self.calibration_digest}): router and shards need the same calibration"
            )
        elif not all(
            _same_calibration(r.thresholds, thresholds_proto(plan.thresholds(r.searched_subjects)))
            for r in response.results
        ):
            theirs = response.results[0].thresholds
            missing.error = (
                f"judges by another calibration ({theirs.source!r}, hit {theirs.hit:g}) than the node "
                f"({plan.calibration.source!r}): router and shards need the same calibration"
            )
        else:
            return response
        return missing

    async def Identify(
        self, request: gal.IdentifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.IdentifyResponse:
        started = time.perf_counter()
        await self._refuse_gallery_nodes(context)
        try:
            plan = check_identify(request, self.config)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        timeout_s = self._budget(context, self.config.shard_deadline_s)
        answers = await asyncio.gather(*(self._search(s, request, plan, timeout_s) for s in self.shards))
        responses = [a for a in answers if isinstance(a, gal.IdentifyResponse)]
        missing = [a for a in answers if isinstance(a, gal.MissingShard)]
        for m in missing:
            if self._missing is not None:
                self._missing.labels(self.node, str(m.partition.index)).inc()
            log.warning(
                "shard missing from a search",
                node=self.node,
                shard=m.partition.index,
                address=m.address,
                error=m.error,
                probes=[p.probe_id for p in request.probes],
            )
        if not responses:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no shard of the {self.node} node answered: "
                + "; ".join(f"shard {m.partition.index} ({m.address}): {m.error}" for m in missing),
            )
        merged = self._merge(request, plan, responses, missing)
        await asyncio.to_thread(self.releases.returned, caller_name(), merged)
        log.info(
            "identify",
            node=self.node,
            probes=[p.probe_id for p in request.probes],
            decisions=[bio.DecisionBand.Name(r.decision) for r in merged.results],
            shards=len(self.shards),
            missing=[m.partition.index for m in missing],
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return merged

    def _merge(
        self,
        request: gal.IdentifyRequest,
        plan: IdentifyPlan,
        responses: Sequence[gal.IdentifyResponse],
        missing: Sequence[gal.MissingShard],
    ) -> gal.IdentifyResponse:
        """One answer from the shards' answers: per probe, the best ``k`` candidates of all of
        them, ranked again and banded by the node's thresholds."""
        # Thresholds for the whole gallery the answering shards hold (a shard's own are for its
        # share, lower): FPIR grows with the number of subjects searched.
        searched = sum(r.results[0].searched_subjects for r in responses if r.results)
        merged = gal.IdentifyResponse(
            node=self.node,
            calibration_digest=self.calibration_digest,
            gallery_size=sum(r.gallery_size for r in responses),
        )
        for i, probe in enumerate(request.probes):
            best: dict[str, gal.Candidate] = {}
            for response in responses:
                for candidate in response.results[i].candidates:
                    kept = best.get(candidate.subject_id)
                    if kept is None or candidate.fused_score > kept.fused_score:
                        best[candidate.subject_id] = candidate
            candidates = [gal.Candidate() for _ in best]
            for out, candidate in zip(candidates, best.values(), strict=True):
                out.CopyFrom(candidate)
            result = merged.results.add(
                probe_id=probe.probe_id,
                thresholds=thresholds_proto(plan.probe_thresholds(i, searched)),
                unusable_fingers=[issue.to_proto() for issue in plan.probes[i].issues],
                searched_subjects=sum(r.results[i].searched_subjects for r in responses),
                fully_scored_subjects=sum(r.results[i].fully_scored_subjects for r in responses),
                missing_shards=missing,
            )
            for candidate in candidates:
                plan.judge(candidate, searched)  # by the whole node's thresholds, not a shard's
            rank_candidates(result, candidates, plan.k)
        return merged

    # -- Enroll / Remove / GetStats -------------------------------------------------------------

    async def Enroll(
        self, request_iterator: AsyncIterator[gal.EnrollRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.EnrollResponse:
        await self._refuse_gallery_nodes(context)
        groups: dict[int, list[gal.EnrollRequest]] = {}
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
            found = check_enrollment(request, where, seen, self.records, self.node)
            if not found:
                try:
                    decode_tenprint(request.tenprint, f"{where}.tenprint")
                except InvalidRequest as error:
                    found = error.violations
            if found:
                violations.extend(found)
                continue
            groups.setdefault(owner(request.subject_id, len(self.shards)), []).append(request)
        if violations:
            await abort_invalid(
                context, InvalidRequest(violations, "enrollment rejected; nothing was stored")
            )
        timeout_s = context.time_remaining()
        outcomes = await asyncio.gather(
            *(
                self._enroll(self.shards[index], requests, timeout_s)
                for index, requests in sorted(groups.items())
            ),
            return_exceptions=True,
        )
        await self._fail_on(context, outcomes, "enrolment", "sending the same stream again is safe")
        enrolled = sum(o.enrolled for o in outcomes if isinstance(o, gal.EnrollResponse))
        size = await self._gallery_size(timeout_s)
        log.info("enrolled", node=self.node, subjects=enrolled, shards=len(groups), gallery_size=size)
        return gal.EnrollResponse(enrolled=enrolled, gallery_size=size)

    async def _enroll(
        self, shard: ShardClient, requests: list[gal.EnrollRequest], timeout_s: float | None
    ) -> gal.EnrollResponse:
        try:
            return await shard.stub.Enroll(iter(requests), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise ShardFailure(shard, error.code(), error.details() or "") from error

    async def _fail_on(
        self, context: grpc.aio.ServicerContext[Any, Any], outcomes: Sequence[object], what: str, advice: str
    ) -> None:
        """Fails the call, naming every shard whose part failed (the other parts are done)."""
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if not failures:
            return
        for failure in failures:
            if not isinstance(failure, ShardFailure):
                raise failure
        shard_failures = [f for f in failures if isinstance(f, ShardFailure)]
        done = len(outcomes) - len(failures)
        log.error(what + " failed on shards", node=self.node, errors=[str(f) for f in shard_failures])
        code = shard_failures[0].code if len(shard_failures) == 1 else grpc.StatusCode.UNAVAILABLE
        await context.abort(
            code,
            f"{what} failed on {'; '.join(str(f) for f in shard_failures)}. "
            f"The part of {done} other shard(s) is done; {advice}.",
        )

    async def Remove(
        self, request: gal.RemoveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.RemoveResponse:
        await self._refuse_gallery_nodes(context)
        try:
            check_remove(request)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        timeout_s = context.time_remaining()
        groups = by_owner(request.subject_ids, len(self.shards))
        outcomes = await asyncio.gather(
            *(self._remove(self.shards[index], ids, timeout_s) for index, ids in sorted(groups.items())),
            return_exceptions=True,
        )
        await self._fail_on(context, outcomes, "removal", "removing the same subjects again is safe")
        removed = sum(o.removed for o in outcomes if isinstance(o, gal.RemoveResponse))
        size = await self._gallery_size(timeout_s)
        log.info("removed", node=self.node, subjects=removed, gallery_size=size)
        return gal.RemoveResponse(removed=removed, gallery_size=size)

    async def _remove(
        self, shard: ShardClient, ids: list[str], timeout_s: float | None
    ) -> gal.RemoveResponse:
        try:
            return await shard.stub.Remove(gal.RemoveRequest(subject_ids=ids), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise ShardFailure(shard, error.code(), error.details() or "") from error

    async def _stats(self, shard: ShardClient, timeout_s: float | None) -> gal.GalleryStats:
        try:
            return await shard.stub.GetStats(
                gal.GetStatsRequest(), timeout=timeout_s or self.config.shard_deadline_s
            )
        except grpc.aio.AioRpcError as error:
            raise ShardFailure(shard, error.code(), error.details() or "") from error

    async def _gallery_size(self, timeout_s: float | None) -> int:
        """The node's gallery size after a change, from the shards that answer (an enrolment or
        removal already done is not failed for a statistic)."""
        stats = await asyncio.gather(
            *(self._stats(s, timeout_s) for s in self.shards), return_exceptions=True
        )
        for failure in (s for s in stats if isinstance(s, BaseException)):
            log.warning("gallery size without a shard", node=self.node, error=str(failure))
        return sum(s.gallery_size for s in stats if isinstance(s, gal.GalleryStats))

    async def GetSubject(
        self, request: gal.GetSubjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.Subject:
        """Passed on to the shard that owns the subject, if the caller may have it (need to know:
        :mod:`nodes.gallery.releases`); the release recorded before it goes out."""
        await self._refuse_gallery_nodes(context)
        try:
            check_get_subject(request)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        caller = caller_name()
        if not await asyncio.to_thread(self.releases.may_release, caller, request):
            await deny(context, self.releases.refusal(), tcn=request.probe_id)
        shard = self.shards[owner(request.subject_id, len(self.shards))]
        try:
            subject = await shard.stub.GetSubject(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), f"{shard.describe()}: {error.details()}")
            raise  # unreachable: abort raises
        await asyncio.to_thread(self.releases.released, caller, request)
        return subject

    async def GetStats(
        self, request: gal.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.GalleryStats:
        await self._refuse_gallery_nodes(context)
        outcomes = await asyncio.gather(
            *(self._stats(s, self._budget(context, self.config.shard_deadline_s)) for s in self.shards),
            return_exceptions=True,
        )
        await self._fail_on(context, outcomes, "statistics", "ask again once the shard is back")
        stats = [o for o in outcomes if isinstance(o, gal.GalleryStats)]
        versions = sorted({s.template_format_version for s in stats})
        if len(versions) > 1:
            log.warning("shards on different template formats", node=self.node, versions=versions)
        merged = gal.GalleryStats(
            node=self.node,
            gallery_size=sum(s.gallery_size for s in stats),
            finger_count=sum(s.finger_count for s in stats),
            template_format_version=versions[0],
            device=",".join(sorted({s.device for s in stats})),
            thresholds=thresholds_proto(
                self.config.thresholds.for_gallery(sum(s.gallery_size for s in stats))
            ),
            memory=merged_memory(stats),
        )
        # Per subject: the node's bytes over the node's subjects, not a mean of shard ratios.
        return with_memory_totals(merged)


def merged_memory(stats: Sequence[gal.GalleryStats]) -> list[gal.GalleryMemory]:
    """The shards' memory parts summed by part and location (shards on one kind of device,
    e.g. ``cuda:0`` each on its own host, add up to one line)."""
    sums: dict[tuple[str, str], gal.GalleryMemory] = {}
    for shard in stats:
        for m in shard.memory:
            total = sums.setdefault((m.part, m.location), gal.GalleryMemory(part=m.part, location=m.location))
            total.bytes += m.bytes
            total.reserved_bytes += m.reserved_bytes
    return [sums[key] for key in sorted(sums)]


@dataclass
class GalleryRouterService:
    """A running router: its gRPC host and the channels to its shards."""

    host: ServiceHost
    router: GalleryRouter
    channels: list[grpc.aio.Channel]

    async def start(self) -> int:
        return await self.host.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.host.stop(grace_s)
        for channel in self.channels:
            await channel.close(None)
        self.router.releases.store.close()


def build_gallery_router(
    config: NodeConfig, records: RecordStore[Any], database_url: str | None = None
) -> GalleryRouterService:
    """The router of a sharded node (not yet started). ``records`` checks enrolments. The router
    holds no gallery; in the node's database (``database_url``, else the SQLite file in its data
    directory, which its shards on one machine share) it keeps only what it returned to whom."""
    if config.role != "router":
        raise ValueError(f"role {config.role!r} is not a router")
    private_directory(config.data_dir)
    store: GalleryStore[Any] = GalleryStore(
        database_url or f"sqlite:///{config.data_dir / (config.node + '.sqlite')}", records
    )
    releases = ReleaseLedger(store, config.node, config.release_window_s, config.release_max_records)
    count = len(config.shards)
    channels = [
        # No gRPC retries: a shard that did not answer is reported missing, within the deadline.
        # The shards serve with their node's certificate: only that node's is accepted.
        open_channel(
            address, config.tls, server=config.node, insecure=config.insecure, balanced=True, retries=False
        )
        for address in config.shards
    ]
    shards = [
        ShardClient(Partition(i, count), address, gal_grpc.GalleryServiceStub(channel))
        for i, (address, channel) in enumerate(zip(config.shards, channels, strict=True))
    ]
    router = GalleryRouter(config, records, shards, releases)
    host = ServiceHost(
        config.listen,
        [
            service(
                gal.DESCRIPTOR.services_by_name["GalleryService"],
                gal_grpc.add_GalleryServiceServicer_to_server,
                router,
            )
        ],
        config.tls,
        insecure=config.insecure,
        # A router is called by the coordinator and administrators, never by a gallery node.
        access=AccessPolicy(table=table_without(Role.GALLERY_NODE)),
        denials=config.refusals.ledger(),
        metrics_listen=config.metrics_listen,
        health_listen=config.health_listen,
    )
    router.register_metrics(host.metrics.registry)
    return GalleryRouterService(host, router, channels)
