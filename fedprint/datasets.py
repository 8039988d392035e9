"""A data set in the standard layout (DESIGN.md: ``manifest.csv`` beside the template files) as
gallery-node requests: its gallery captures as ``Enroll`` messages, its probe captures as
``Identify`` probes, read from disk only when a message is made, so a gallery of any size can be
streamed to a node.

Data sets carry templates, not records: each enrolment carries the node's record with the
subject id alone (no descriptors, no history), which is a valid record of either kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedprint.gallery.v1 import gallery_pb2 as gal
from fedprint.tenprint import tenprint_to_proto
from minutiae.dataset import CaptureRef, capture_refs, enrolled_captures, load_capture

#: The ``EnrollRequest.record`` field of each kind of record.
RECORD_FIELDS = ("criminal_history", "immigration_history")


@dataclass(frozen=True)
class DatasetEnrolment:
    """One subject's gallery capture, enrolled with an empty record in ``record_field``."""

    data: Path
    capture: CaptureRef
    record_field: str

    @property
    def subject_id(self) -> str:
        return self.capture.subject_id

    def enroll_request(self) -> gal.EnrollRequest:
        """The ``Enroll`` message, its templates read from the data set now."""
        templates = load_capture(self.data, self.capture).tenprint
        request = gal.EnrollRequest(subject_id=self.subject_id, tenprint=tenprint_to_proto(templates))
        getattr(request, self.record_field).subject_id = self.subject_id
        return request


def gallery_enrolments(
    data: Path, record_field: str, refs: Sequence[CaptureRef] | None = None
) -> list[DatasetEnrolment]:
    """One enrolment per subject with a gallery capture (its first), in manifest order; ``refs``
    are the data set's captures when the caller has read them already."""
    if record_field not in RECORD_FIELDS:
        raise ValueError(f"record field {record_field!r}; known: {', '.join(RECORD_FIELDS)}")
    captures = enrolled_captures(capture_refs(data) if refs is None else refs)
    return [DatasetEnrolment(Path(data), ref, record_field) for ref in captures]


def probe_captures(data: Path, refs: Sequence[CaptureRef] | None = None) -> list[CaptureRef]:
    """The data set's probe captures, in manifest order (of ``refs`` when given)."""
    return [ref for ref in (capture_refs(data) if refs is None else refs) if ref.role == "probe"]


def identify_probe(data: Path, capture: CaptureRef, probe_id: str) -> gal.Probe:
    """One probe capture as an ``Identify`` probe."""
    return gal.Probe(probe_id=probe_id, tenprint=tenprint_to_proto(load_capture(data, capture).tenprint))
