"""What a gallery request must satisfy, checked the same way by a node, a shard and a router (which
refuses bad input itself rather than sending it to every shard), and the decision bands.

Nothing here touches the gallery, the store or torch: a router, which holds neither, uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from calibration.thresholds import Thresholds
from fedprint.biometrics.v1 import biometrics_pb2 as bio
from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.rpc import FieldViolation, InvalidRequest
from fedprint.tenprint import DecodedTenPrint, decode_tenprint
from fedprint.validation import PROBE_ID, SUBJECT_ID, Violations, check_count
from nodes.gallery.config import NodeConfig
from nodes.gallery.partition import Partition
from nodes.gallery.records import RecordStore

#: Most subjects one Enroll stream may carry; it is one transaction held in memory.
MAX_ENROLL_PER_STREAM = 50_000
#: Most subject ids one Remove call, or one Identify's gallery subset, may name.
MAX_SUBJECT_IDS = 10_000


def band_of(score: float, thresholds: Thresholds) -> bio.DecisionBand.ValueType:
    """HIT at or above the hit threshold, REVIEW at or above the review threshold, else NO_HIT."""
    if score >= thresholds.hit:
        return bio.HIT
    if score >= thresholds.review:
        return bio.REVIEW
    return bio.NO_HIT


def thresholds_proto(t: Thresholds) -> bio.Thresholds:
    return bio.Thresholds(
        hit=t.hit,
        review=t.review,
        hit_fpir=t.hit_fpir,
        review_fpir=t.review_fpir,
        source=t.source,
        gallery_size=t.gallery_size or 0,
    )


@dataclass(frozen=True)
class IdentifyPlan:
    """A valid Identify request: its probes decoded, the calibration it is judged by, the
    target FPIR it asked for (None: the calibration's), and k."""

    probes: list[DecodedTenPrint]
    calibration: Thresholds
    target_fpir: float | None
    k: int
    # Every candidate of every probe asks; there are at most ten finger counts per gallery size.
    _derived: dict[tuple[int, int], Thresholds] = field(default_factory=dict, compare=False, repr=False)

    def thresholds(self, gallery_size: int, fingers: int = 10) -> Thresholds:
        """The thresholds for a search of ``gallery_size`` subjects comparing ``fingers`` fingers
        with a candidate: the calibration's FPIRs (or the requested one) hold there when the
        calibration has tails."""
        key = (gallery_size, fingers)
        if key not in self._derived:
            thresholds = self.calibration.for_gallery(gallery_size, fingers)
            if self.target_fpir is not None:
                thresholds = thresholds.for_fpir(self.target_fpir) or thresholds
            self._derived[key] = thresholds
        return self._derived[key]

    def probe_thresholds(self, probe: int, gallery_size: int) -> Thresholds:
        """The thresholds a result of probe ``probe`` states: those of a candidate compared on
        every finger the probe has."""
        return self.thresholds(gallery_size, max(1, len(self.probes[probe].templates.fingers)))

    def band(self, score: float, fingers_compared: int, gallery_size: int) -> bio.DecisionBand.ValueType:
        """The band of a candidate: by the thresholds of the fingers it was compared on, since a
        candidate compared on few fingers needs more evidence per finger (see
        :meth:`calibration.thresholds.Thresholds.for_gallery`)."""
        return band_of(score, self.thresholds(gallery_size, fingers_compared))

    def judge(self, candidate: gal.Candidate, gallery_size: int) -> None:
        """Sets ``candidate``'s band, hit margin and agreeing fingers from its scores."""
        fingers = len(candidate.finger_scores)
        thresholds = self.thresholds(gallery_size, max(1, fingers))
        candidate.band = band_of(candidate.fused_score, thresholds)
        candidate.hit_margin = candidate.fused_score - thresholds.hit
        candidate.agreeing_fingers = sum(1 for f in candidate.finger_scores if f.llr > 0.0)


#: Bands from the strongest: a HIT outranks any REVIEW, which outranks any NO_HIT.
_BAND_ORDER = {bio.HIT: 0, bio.REVIEW: 1, bio.NO_HIT: 2}


def rank_candidates(result: gal.ProbeResult, candidates: list[gal.Candidate], k: int) -> None:
    """Puts the best ``k`` of ``candidates`` (judged: see :meth:`IdentifyPlan.judge`) into
    ``result``, ranked, and makes the decision the first one's band.

    The best evidence decides: candidates are ordered by band, then by hit margin, never by raw
    fused score, which is not comparable between candidates compared on different numbers of
    fingers (a three-finger subject's fused -1.35 is weaker evidence than a ten-finger subject's
    -9.38 in the review band). So the decision is the highest band of any candidate, and
    ``decided_by`` names the candidate that carries it."""
    ordered = sorted(
        candidates, key=lambda c: (_BAND_ORDER.get(c.band, 3), -c.hit_margin, -c.fused_score, c.subject_id)
    )[:k]
    del result.candidates[:]
    for rank, candidate in enumerate(ordered, start=1):
        out = result.candidates.add()
        out.CopyFrom(candidate)
        out.rank = rank
        if out.band != bio.HIT:
            out.ClearField("record")  # minimal disclosure, whoever sent it
    result.decision = result.candidates[0].band if result.candidates else bio.NO_HIT
    result.decided_by = result.candidates[0].subject_id if result.candidates else ""


def check_identify(
    request: gal.IdentifyRequest, config: NodeConfig, calibration: Thresholds | None = None
) -> IdentifyPlan:
    """The plan of a valid request; :class:`InvalidRequest` listing every problem otherwise."""
    violations = Violations()
    if not request.probes:
        violations.add("probes", "at least one probe is required")
    probes_ok = check_count(
        len(request.probes), config.max_probes_per_request, "probes", violations, "probes"
    )
    if request.max_results > config.max_results_limit:
        violations.add("max_results", f"{request.max_results} exceeds {config.max_results_limit}")
    if not 0.0 <= request.target_fpir < 1.0:  # also refuses NaN
        violations.add("target_fpir", "must lie in (0, 1), or 0 for the default")
    if check_count(len(request.subject_ids), MAX_SUBJECT_IDS, "subject_ids", violations, "subject ids"):
        for i, subject_id in enumerate(request.subject_ids):
            SUBJECT_ID.check(subject_id, f"subject_ids[{i}]", violations)
    target = request.target_fpir if request.target_fpir > 0.0 else None
    calibration = calibration or config.thresholds
    if target is not None and not violations and calibration.for_fpir(target) is None:
        violations.add("target_fpir", f"no calibration reaches FPIR {target:g} on this node")
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
    return IdentifyPlan(decoded, calibration, target, request.max_results or 10)


def check_enrollment(
    request: gal.EnrollRequest,
    where: str,
    seen: set[str],
    records: RecordStore[Any],
    node: str,
    partition: Partition | None = None,
) -> list[FieldViolation]:
    """Problems with one message of an Enroll stream (``seen``: ids earlier in the stream).
    ``partition``: a shard's, which must own the subject."""
    if not SUBJECT_ID.valid(request.subject_id):
        bad = Violations()
        SUBJECT_ID.check(request.subject_id, f"{where}.subject_id", bad)
        return bad.reported()
    if request.subject_id in seen:
        return [FieldViolation(f"{where}.subject_id", f"{request.subject_id} appears twice in the stream")]
    seen.add(request.subject_id)
    if partition is not None and not partition.owns(request.subject_id):
        return [FieldViolation(f"{where}.subject_id", f"{request.subject_id} does not belong to {partition}")]
    field = records.record_field
    if request.WhichOneof("record") != field:
        return [FieldViolation(f"{where}.{field}", f"the {node} node needs a {field} record")]
    return records.validate(getattr(request, field), request.subject_id, f"{where}.{field}")


def check_remove(request: gal.RemoveRequest, partition: Partition | None = None) -> None:
    """Raises :class:`InvalidRequest` unless the request names 1 to 10,000 valid subject ids (of
    ``partition``, for a shard)."""
    violations = Violations()
    if not request.subject_ids:
        violations.add("subject_ids", "name at least one subject")
    if check_count(len(request.subject_ids), MAX_SUBJECT_IDS, "subject_ids", violations, "subject ids"):
        for i, subject_id in enumerate(request.subject_ids):
            if SUBJECT_ID.check(subject_id, f"subject_ids[{i}]", violations) and not (
                partition is None or partition.owns(subject_id)
            ):
                violations.add(f"subject_ids[{i}]", f"{subject_id} does not belong to {partition}")
    if violations:
        raise InvalidRequest(violations, "malformed remove request")


#: Longest examiner name a GetSubject request may carry (a certificate subject fits).
MAX_EXAMINER = 512


def check_get_subject(request: gal.GetSubjectRequest) -> None:
    """Raises :class:`InvalidRequest` unless the subject id (and the probe id and examiner, when
    given) are well formed."""
    violations = Violations()
    SUBJECT_ID.check(request.subject_id, "subject_id", violations)
    if request.probe_id:
        PROBE_ID.check(request.probe_id, "probe_id", violations)
    if len(request.examiner) > MAX_EXAMINER or not request.examiner.isprintable():
        violations.add("examiner", f"at most {MAX_EXAMINER} printable characters")
    if violations:
        raise InvalidRequest(violations, "malformed request")


def usable_templates(request: gal.EnrollRequest, decoded: DecodedTenPrint) -> dict[int, tuple[int, bytes]]:
    """The stored form of an enrolment's usable fingers: position -> (format, record bytes)."""
    return {
        int(f.position): (int(f.template.format), f.template.data)
        for f in request.tenprint.fingers
        if f.WhichOneof("data") == "template" and int(f.position) in decoded.templates.fingers
    }


def with_memory_totals(stats: gal.GalleryStats) -> gal.GalleryStats:
    """Fills the device/host totals and per-subject figures of ``stats`` from its ``memory``
    parts and ``gallery_size`` (a node's own parts, or a router's sums over its shards)."""
    on_host = [m for m in stats.memory if m.location == "cpu"]
    on_device = [m for m in stats.memory if m.location != "cpu"]
    stats.host_bytes = sum(m.bytes for m in on_host)
    stats.device_bytes = sum(m.bytes for m in on_device)
    stats.host_reserved_bytes = sum(m.reserved_bytes for m in on_host)
    stats.device_reserved_bytes = sum(m.reserved_bytes for m in on_device)
    subjects = stats.gallery_size
    stats.host_bytes_per_subject = stats.host_bytes / subjects if subjects else 0.0
    stats.device_bytes_per_subject = stats.device_bytes / subjects if subjects else 0.0
    return stats
