"""What the coordinator believes of a gallery node's answer.

A node's answer is a decision only when it is the answer of the node the coordinator means: one
that judges by the calibration the deployment pinned (a digest of its thresholds and evidence
model, :func:`calibration.thresholds.calibration_digest`), searched a gallery at least as large as
the floor the deployment set (a node restarted on an empty data directory answers NO_HIT for
everyone), and answered the probe it was asked. Any other answer is treated as no answer: the
decision is INCOMPLETE and retried, the refusal is audited and counted
(``fedprint_coordinator_untrusted_node_answers_total``, which an alert should watch).
"""

from __future__ import annotations

from functools import cache

from pydantic import BaseModel, Field

from calibration.thresholds import calibrated_thresholds, calibration_digest
from fedprint.gallery.v1 import gallery_pb2 as gal


@cache
def shipped_calibration() -> str:
    """The digest of the calibration shipped with this release (thresholds and evidence model)."""
    return calibration_digest(calibrated_thresholds())


class NodeTrust(BaseModel):
    """The coordinator's pins for one node."""

    calibration: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{16}$",
        description="calibration digest the node must judge by (a node logs its own at start and "
        "reports it in every answer); unset: the calibration shipped with this release",
    )
    min_gallery_size: int = Field(
        default=1,
        ge=0,
        description="smallest gallery the coordinator believes the node searched; set it near the "
        "deployment's gallery size so that a node restarted on empty or partial data is not believed",
    )

    def expected_calibration(self) -> str:
        return self.calibration or shipped_calibration()


#: Why an answer was refused, as the metric's ``reason`` label.
REASONS = ("calibration", "gallery_size", "probe")


def distrust(trust: NodeTrust, response: gal.IdentifyResponse, probe_id: str) -> tuple[str, str] | None:
    """(reason label, explanation) when ``response`` is not to be believed; None when it is."""
    expected = trust.expected_calibration()
    if response.calibration_digest != expected:
        named = response.calibration_digest or "none named"
        return "calibration", f"answered by another calibration ({named}) than the one pinned ({expected})"
    if response.gallery_size < trust.min_gallery_size:
        return (
            "gallery_size",
            f"searched {response.gallery_size} subjects, below the floor of {trust.min_gallery_size}",
        )
    if [r.probe_id for r in response.results] != [probe_id]:
        return "probe", "answered for another probe than the one asked"
    return None
