"""The gallery service both nodes run: ``fedprint.gallery.v1.GalleryService``.

A node is this server plus its :class:`~nodes.gallery.records.RecordStore`
(IAFIS: criminal histories, IDENT: immigration histories).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic

import grpc
import structlog
import torch

from evaluation.calibration import Thresholds
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.gallery.v1 import gallery_pb2_grpc as gal_grpc
from fedprint.rpc import FieldViolation, InvalidRequest, ServiceHost, abort_invalid, service
from fedprint.tenprint import decode_tenprint
from fedprint.validation import PROBE_ID, SUBJECT_ID, Violations, check_count
from gpu_kernels import TenPrintCylinders
from minutiae.iso19794_2 import decode_template
from minutiae.template import TenPrintTemplates
from nodes.gallery.batcher import MicroBatcher
from nodes.gallery.cache import read_cache, write_cache
from nodes.gallery.config import NodeConfig
from nodes.gallery.gallery import TEMPLATE_FORMAT_VERSION, Gallery, SearchResult, resolve_device
from nodes.gallery.metrics import GalleryMetrics
from nodes.gallery.records import RecordStore, RecordT
from nodes.gallery.store import Enrollment, GalleryStore

log = structlog.get_logger(__name__)

#: Most subjects one Enroll stream may carry; it is one transaction held in memory.
MAX_ENROLL_PER_STREAM = 50_000
#: Most subject ids one Remove call, or one Identify's gallery subset, may name.
MAX_SUBJECT_IDS = 10_000
#: Subjects encoded per device call when loading the gallery at start-up.
LOAD_CHUNK = 512


@dataclass(frozen=True)
class _SearchItem:
    tenprint: TenPrintTemplates
    k: int


def band_of(score: float, thresholds: Thresholds) -> bio.DecisionBand.ValueType:
    """HIT at or above the hit threshold, REVIEW at or above the review threshold, else NO_HIT."""
    if score >= thresholds.hit:
        return bio.HIT
    if score >= thresholds.review:
        return bio.REVIEW
    return bio.NO_HIT


def thresholds_proto(t: Thresholds) -> bio.Thresholds:
    return bio.Thresholds(
        hit=t.hit, review=t.review, hit_fpir=t.hit_fpir, review_fpir=t.review_fpir, source=t.source
    )


@dataclass(frozen=True)
class LoadedGallery:
    """How a node's gallery was loaded at start-up."""

    subjects: int
    #: The store's state token the in-memory gallery reflects.
    token: str
    #: Mapped from the encoded-gallery cache rather than encoded from the stored templates.
    from_cache: bool


def load_gallery(store: GalleryStore[Any], gallery: Gallery, cache: Path | None = None) -> LoadedGallery:
    """Fills ``gallery`` from the store: from the encoded-gallery ``cache`` when it matches the
    store, else by decoding and encoding every stored template (then the cache is rewritten)."""
    token = store.token()
    if cache is not None:
        cached = read_cache(
            cache,
            token=token,
            format_version=TEMPLATE_FORMAT_VERSION,
            params=gallery.params,
            device=gallery.device,
        )
        if cached is not None:
            gallery.add(cached.subject_ids, cached.cylinders)
            return LoadedGallery(len(cached.subject_ids), token, from_cache=True)
    loaded = _encode_stored(store, gallery)
    if cache is not None and loaded:
        save_gallery(gallery, cache, token)
    return LoadedGallery(loaded, token, from_cache=False)


def save_gallery(gallery: Gallery, cache: Path, token: str) -> None:
    """Writes the gallery's cylinders to the encoded-gallery cache under the store's ``token``."""
    ids, cylinders = gallery.contents()
    if cylinders is None:
        return
    write_cache(
        cache, token=token, format_version=TEMPLATE_FORMAT_VERSION, subject_ids=list(ids), cylinders=cylinders
    )


def _encode_stored(store: GalleryStore[Any], gallery: Gallery) -> int:
    ids: list[str] = []
    tenprints: list[TenPrintTemplates] = []
    loaded = 0

    def flush() -> None:
        nonlocal loaded
        if ids:
            gallery.add(ids, gallery.encode(tenprints))
            loaded += len(ids)
            ids.clear()
            tenprints.clear()

    for subject_id, fingers in store.templates():
        ids.append(subject_id)
        tenprints.append(TenPrintTemplates({p: decode_template(data) for p, (_, data) in fingers.items()}))
        if len(ids) >= LOAD_CHUNK:
            flush()
    flush()
    return loaded


class GalleryServicer(gal_grpc.GalleryServiceServicer, Generic[RecordT]):
    """Identify, Enroll, Remove and GetStats over one node's store and in-memory gallery."""

    def __init__(self, config: NodeConfig, store: GalleryStore[RecordT], gallery: Gallery) -> None:
        self.config = config
        self.node = config.node
        self.store = store
        self.gallery = gallery
        self.batcher: MicroBatcher[_SearchItem, SearchResult] = MicroBatcher(
            self._search_batch,
            max_batch=config.batching.max_batch,
            max_wait_s=config.batching.max_wait_ms / 1000,
        )
        #: Set once the node's host exists (:func:`build_gallery_node`).
        self.metrics: GalleryMetrics | None = None

    @property
    def records(self) -> RecordStore[RecordT]:
        return self.store.records

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

    def _validate_identify(self, request: gal.IdentifyRequest) -> tuple[list[Any], Thresholds, int]:
        violations = Violations()
        if not request.probes:
            violations.add("probes", "at least one probe is required")
        probes_ok = check_count(
            len(request.probes), self.config.max_probes_per_request, "probes", violations, "probes"
        )
        if request.max_results > self.config.max_results_limit:
            violations.add("max_results", f"{request.max_results} exceeds {self.config.max_results_limit}")
        if not 0.0 <= request.target_fpir < 1.0:  # also refuses NaN
            violations.add("target_fpir", "must lie in (0, 1), or 0 for the default")
        if check_count(len(request.subject_ids), MAX_SUBJECT_IDS, "subject_ids", violations, "subject ids"):
            for i, subject_id in enumerate(request.subject_ids):
                SUBJECT_ID.check(subject_id, f"subject_ids[{i}]", violations)
        thresholds = self.config.thresholds
        if request.target_fpir > 0.0 and not violations:
            derived = thresholds.for_fpir(request.target_fpir)
            if derived is None:
                violations.add(
                    "target_fpir", f"no calibration reaches FPIR {request.target_fpir:g} on this node"
                )
            else:
                thresholds = derived
        decoded = []
        seen: set[str] = set()
        for i, probe in enumerate(request.probes if probes_ok else []):
            if PROBE_ID.check(probe.probe_id, f"probes[{i}].probe_id", violations):
                if probe.probe_id in seen:
                    violations.add(f"probes[{i}].probe_id", "probe id repeated")
                seen.add(probe.probe_id)
            try:
                decoded.append(decode_tenprint(probe.tenprint, f"probes[{i}].tenprint"))
            except InvalidRequest as error:
                violations.extend(error.violations)
        if violations:
            raise InvalidRequest(violations, "malformed identify request")
        return decoded, thresholds, request.max_results or 10

    async def Identify(
        self, request: gal.IdentifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.IdentifyResponse:
        started = time.perf_counter()
        try:
            decoded, thresholds, k = self._validate_identify(request)
        except InvalidRequest as error:
            await abort_invalid(context, error)
        if request.subject_ids:
            results = await asyncio.to_thread(
                self._search_subset, [d.templates for d in decoded], k, list(request.subject_ids)
            )
        else:
            results = list(
                await asyncio.gather(*(self.batcher.submit(_SearchItem(d.templates, k)) for d in decoded))
            )
        # Minimal disclosure: a record goes out only with a HIT candidate. Review-band and no-hit
        # candidates carry their subject id and scores, nothing about the person.
        hit_ids = sorted(
            {m.subject_id for r in results for m in r.matches if band_of(m.fused, thresholds) == bio.HIT}
        )
        records = await asyncio.to_thread(self.store.get_records, hit_ids) if hit_ids else {}
        response = gal.IdentifyResponse(node=self.node)
        for probe, d, searched in zip(request.probes, decoded, results, strict=True):
            result = response.results.add(
                probe_id=probe.probe_id,
                thresholds=thresholds_proto(thresholds),
                unusable_fingers=[issue.to_proto() for issue in d.issues],
                searched_subjects=searched.searched,
                fully_scored_subjects=searched.fully_scored,
            )
            for rank, match in enumerate(searched.matches, start=1):
                candidate = result.candidates.add(
                    subject_id=match.subject_id,
                    rank=rank,
                    fused_score=match.fused,
                    band=band_of(match.fused, thresholds),
                )
                for position, score in sorted(match.finger_scores.items()):
                    candidate.finger_scores.add(
                        position=bio.FingerPosition.ValueType(position),
                        score=score,
                        probe_minutiae=d.templates.fingers[position].count,
                        candidate_minutiae=match.candidate_minutiae.get(position, 0),
                    )
                record = records.get(match.subject_id) if candidate.band == bio.HIT else None
                if record is not None:
                    getattr(candidate, self.records.record_field).CopyFrom(record)
            result.decision = result.candidates[0].band if result.candidates else bio.NO_HIT
        log.info(
            "identify",
            node=self.node,
            probes=[p.probe_id for p in request.probes],
            decisions=[bio.DecisionBand.Name(r.decision) for r in response.results],
            top_scores=[
                round(r.candidates[0].fused_score, 4) if r.candidates else None for r in response.results
            ],
            searched=[r.searched for r in results],
            fully_scored=[r.fully_scored for r in results],
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if self.metrics is not None:
            self.metrics.observe_identify(response)
        return response

    # -- Enroll / Remove / GetStats -------------------------------------------------------------

    async def Enroll(
        self, request_iterator: AsyncIterator[gal.EnrollRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.EnrollResponse:
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
            found = self._validate_enrollment(request, where, seen)
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
            usable = {
                int(f.position): (int(f.template.format), f.template.data)
                for f in request.tenprint.fingers
                if f.WhichOneof("data") == "template" and int(f.position) in decoded.templates.fingers
            }
            enrollments.append(Enrollment(request.subject_id, usable, record))
            tenprints.append(decoded.templates)
        if violations:
            await abort_invalid(
                context, InvalidRequest(violations, "enrollment rejected; nothing was stored")
            )
        if not enrollments:
            return gal.EnrollResponse(enrolled=0, gallery_size=len(self.gallery))
        # Encode before storing: if encoding fails, nothing has been written.
        cylinders = await asyncio.to_thread(self.gallery.encode, tenprints)
        await asyncio.to_thread(self.store.enroll, enrollments)
        self.gallery.add([e.subject_id for e in enrollments], cylinders)
        log.info("enrolled", node=self.node, subjects=len(enrollments), gallery_size=len(self.gallery))
        return gal.EnrollResponse(enrolled=len(enrollments), gallery_size=len(self.gallery))

    def _validate_enrollment(
        self, request: gal.EnrollRequest, where: str, seen: set[str]
    ) -> list[FieldViolation]:
        if not SUBJECT_ID.valid(request.subject_id):
            bad = Violations()
            SUBJECT_ID.check(request.subject_id, f"{where}.subject_id", bad)
            return bad.reported()
        if request.subject_id in seen:
            return [
                FieldViolation(f"{where}.subject_id", f"{request.subject_id} appears twice in the stream")
            ]
        seen.add(request.subject_id)
        field = self.records.record_field
        if request.WhichOneof("record") != field:
            return [FieldViolation(f"{where}.{field}", f"the {self.node} node needs a {field} record")]
        return self.records.validate(getattr(request, field), request.subject_id, f"{where}.{field}")

    async def Remove(
        self, request: gal.RemoveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.RemoveResponse:
        violations = Violations()
        if not request.subject_ids:
            violations.add("subject_ids", "name at least one subject")
        if check_count(len(request.subject_ids), MAX_SUBJECT_IDS, "subject_ids", violations, "subject ids"):
            for i, subject_id in enumerate(request.subject_ids):
                SUBJECT_ID.check(subject_id, f"subject_ids[{i}]", violations)
        if violations:
            await abort_invalid(context, InvalidRequest(violations, "malformed remove request"))
        ids = list(request.subject_ids)
        removed = await asyncio.to_thread(self.store.remove, ids)
        self.gallery.remove(ids)
        log.info("removed", node=self.node, subjects=removed, gallery_size=len(self.gallery))
        return gal.RemoveResponse(removed=removed, gallery_size=len(self.gallery))

    async def GetSubject(
        self, request: gal.GetSubjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.Subject:
        violations = Violations()
        if not SUBJECT_ID.check(request.subject_id, "subject_id", violations):
            await abort_invalid(context, InvalidRequest(violations, "malformed request"))
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
        log.info("subject released for review", node=self.node, subject_id=request.subject_id)
        return subject

    async def GetStats(
        self, request: gal.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gal.GalleryStats:
        return gal.GalleryStats(
            node=self.node,
            gallery_size=len(self.gallery),
            finger_count=self.gallery.finger_count,
            template_format_version=TEMPLATE_FORMAT_VERSION,
            device=str(self.gallery.device),
            thresholds=thresholds_proto(self.config.thresholds),
        )


@dataclass
class GalleryNode:
    """A running node: its gRPC host and what to close on shutdown."""

    host: ServiceHost
    servicer: GalleryServicer[Any]
    loaded: LoadedGallery
    #: The encoded-gallery cache directory, or None when the node keeps none.
    cache: Path | None = None

    async def start(self) -> int:
        """Starts serving; returns the bound port."""
        return await self.host.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops serving after the calls in flight; refreshes the gallery cache if enrolments or
        removals changed the gallery since start-up (a crash skips this: the next start-up sees
        a stale token and re-encodes)."""
        await self.host.stop(grace_s)
        await self.servicer.batcher.close()
        store = self.servicer.store
        if self.cache is not None:
            token = store.token()
            if token != self.loaded.token:
                await asyncio.to_thread(save_gallery, self.servicer.gallery, self.cache, token)
        store.close()


def build_gallery_node(
    config: NodeConfig, records: RecordStore[Any], database_url: str | None = None
) -> GalleryNode:
    """Opens the node's store with its record model, loads its gallery onto the device, and
    prepares the server. Each node package supplies ``records``; this server knows none by name."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.torch_threads is not None:
        # Nodes sharing a machine must not each spin up one thread per core.
        torch.set_num_threads(config.torch_threads)
    url = database_url or f"sqlite:///{config.data_dir / (config.node + '.sqlite')}"
    store = GalleryStore(url, records)
    gallery = Gallery(resolve_device(config.device), shortlist=config.shortlist)
    cache = config.data_dir / f"{config.node}.cylinders" if config.gallery_cache else None
    started = time.perf_counter()
    loaded = load_gallery(store, gallery, cache)
    log.info(
        "gallery loaded",
        node=config.node,
        subjects=loaded.subjects,
        from_cache=loaded.from_cache,
        s=round(time.perf_counter() - started, 2),
        device=str(gallery.device),
        bytes=gallery.nbytes,
    )
    servicer: GalleryServicer[Any] = GalleryServicer(config, store, gallery)
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
        metrics_listen=config.metrics_listen,
        health_listen=config.health_listen,
    )
    servicer.metrics = GalleryMetrics(host.metrics.registry, servicer)
    return GalleryNode(host, servicer, loaded, cache)
