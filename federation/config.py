"""Configuration of the federation coordinator."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from federation.trust import NodeTrust
from fedprint.settings import RateLimit, ServiceSettings
from fedprint.validation import ORI


class CoordinatorConfig(ServiceSettings):
    """The federation coordinator."""

    iafis_address: str
    ident_address: str
    ice_address: str
    node_deadline_s: float = Field(default=20.0, gt=0, description="deadline of each node search")
    iafis_trust: NodeTrust = Field(
        default_factory=NodeTrust,
        description="calibration and gallery floor IAFIS answers must show",
    )
    ident_trust: NodeTrust = Field(
        default_factory=NodeTrust,
        description="calibration and gallery floor IDENT answers must show",
    )
    ice_deadline_s: float = Field(default=5.0, gt=0)
    max_candidates: int = Field(default=5, ge=1, description="candidates kept per node in a decision")
    policy_path: Path | None = Field(default=None, description="threat policy YAML; the bundled one if unset")
    authorized_oris: list[str] = Field(
        default_factory=list,
        description="ORIs allowed to submit (besides their certificate); empty: any agency the CA certified",
    )
    rate_limit: RateLimit | None = Field(
        default_factory=RateLimit, description="calls per agency ORI (RESOURCE_EXHAUSTED past it); null: none"
    )
    outbox_retry_initial_s: float = Field(default=0.5, gt=0)
    outbox_retry_max_s: float = Field(default=30.0, gt=0)
    # At the 30 s cap, 200 attempts keep retrying for about an hour and a half of ICE outage
    # before a notification needs an operator.
    outbox_max_attempts: int = Field(
        default=200, ge=1, description="failed deliveries before a notification becomes a dead letter"
    )
    outbox_dead_letter_retention_s: float = Field(
        default=30 * 24 * 3600.0,
        gt=0,
        description="how long a dead letter keeps its notice for an operator's retry; then the notice is "
        "purged (TCN, level and digest stay)",
    )
    retry_initial_s: float = Field(
        default=2.0, gt=0, description="first wait before an incomplete booking is searched again"
    )
    retry_max_s: float = Field(default=60.0, gt=0, description="longest wait between such retries")
    review_claim_s: float = Field(
        default=3600.0,
        gt=0,
        description="how long an examiner's claim on a review lasts before it returns to the queue",
    )
    review_overdue_s: float = Field(
        default=4 * 3600.0,
        gt=0,
        description="age past which a review waiting for a verdict is reported overdue (list, stats, metric)",
    )
    replica_id: str | None = Field(
        default=None,
        max_length=253,  # a Kubernetes pod name; claims carry only a hash of it
        description=(
            "a name unique among the replicas and stable across restarts (e.g. the pod name): "
            "restarted after a crash, the replica frees its dead life's outbox and retry claims at "
            "once; unset, they expire with their leases"
        ),
    )
    audit_key_file: Path | None = Field(
        default=None,
        description="hex key of the audit log's MAC chain, off the database; data_dir/audit.key if unset",
    )
    audit_checkpoint_dir: Path | None = Field(
        default=None,
        description="directory, on another volume than the database, for signed audit checkpoints",
    )
    audit_checkpoint_interval_s: float = Field(
        default=60.0, gt=0, description="how often the coordinator writes an audit checkpoint"
    )
    booking_key_file: Path | None = Field(
        default=None,
        description="hex AES-256 key sealing incomplete bookings at rest; data_dir/booking.key if unset",
    )

    @field_validator("authorized_oris")
    @classmethod
    def _oris_are_nine_chars(cls, oris: list[str]) -> list[str]:
        for ori in oris:
            if not ORI.valid(ori):
                raise ValueError(f"ORI {ori!r} must be nine upper-case letters or digits")
        return oris

    def audit_key_path(self) -> Path:
        """Where the audit key is: ``audit_key_file``, else beside the coordinator's data."""
        return self.audit_key_file or self.data_dir / "audit.key"
