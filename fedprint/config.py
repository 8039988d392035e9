"""Service configuration: one YAML file per service, validated by pydantic.

Every field can be overridden from the environment (``FEDPRINT_<FIELD>``, nested
fields joined by ``__``), which is how the Helm chart injects addresses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedprint.pki import TlsFiles


class Thresholds(BaseModel):
    """Fused-score thresholds of a gallery node and what they were calibrated for."""

    hit: float = Field(ge=0.0, le=1.0, description="fused score at or above which a candidate is a hit")
    review: float = Field(ge=0.0, le=1.0, description="fused score at or above which an examiner reviews")
    hit_fpir: float = Field(default=1e-3, gt=0.0, lt=1.0)
    review_fpir: float = Field(default=1e-2, gt=0.0, lt=1.0)
    source: str = "configuration"
    fpir_curve: list[tuple[float, float]] = Field(
        default_factory=list,
        description="calibration points (fpir, threshold) from `fedprint eval --calibrate`, for target_fpir",
    )

    @model_validator(mode="after")
    def _review_below_hit(self) -> Self:
        if self.review > self.hit:
            raise ValueError(f"review threshold {self.review} is above hit threshold {self.hit}")
        return self

    def for_fpir(self, target: float) -> Self | None:
        """The thresholds with the hit threshold moved to reach ``target`` FPIR, or None without a curve.

        Picks the lowest calibrated threshold whose FPIR is at or below the target; the
        review threshold stays where it is unless it would lie above the hit threshold.
        """
        eligible = [threshold for fpir, threshold in self.fpir_curve if fpir <= target]
        if not eligible:
            return None
        hit = min(eligible)
        return self.model_copy(
            update={
                "hit": hit,
                "hit_fpir": target,
                "review": min(self.review, hit),
                "source": f"{self.source}+fpir",
            }
        )


#: Thresholds written by `fedprint eval --calibrate`, shipped with the package.
CALIBRATED_THRESHOLDS = Path(__file__).with_name("thresholds.yaml")


def calibrated_thresholds(path: Path = CALIBRATED_THRESHOLDS) -> Thresholds:
    """The ``thresholds:`` section of a calibration file (by default the one shipped)."""
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict) or "thresholds" not in loaded:
        raise ValueError(f"{path}: no thresholds section")
    return Thresholds.model_validate(loaded["thresholds"])


class BatchingConfig(BaseModel):
    """Dynamic micro-batching of concurrent Identify calls into one device call."""

    max_batch: int = Field(default=16, ge=1, description="most probes scored in one device call")
    max_wait_ms: float = Field(default=5.0, ge=0.0, description="longest a probe waits for companions")


class ShortlistConfig(BaseModel):
    """The faiss shortlist tier in front of full MCC (:mod:`gpu_kernels.shortlist`).

    Below ``min_gallery`` subjects the node scores every subject with full MCC: it is exact and,
    at that size, fast enough. Above it, a compact code per subject votes ``candidates``
    subjects per probe and only those are scored with full MCC.
    """

    enabled: bool = True
    # Full MCC of 1,000 candidates costs what exhaustive search of 1,000 subjects does, so the
    # tiers pay off from a few thousand subjects; 20,000 keeps smaller galleries exact, and is
    # where the tiers are already about ten times faster (56x at 100,000, docs/bench/).
    min_gallery: int = Field(
        default=20_000, ge=1, description="galleries smaller than this are searched exhaustively"
    )
    # 1,000 kept every mate of 400 searches of a 100,000-subject realistic gallery (300: 99.25 %).
    candidates: int = Field(default=1_000, ge=1, description="subjects per probe that full MCC scores")


class _ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDPRINT_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field(default="127.0.0.1:0", description="host:port the gRPC server binds")
    data_dir: Path = Field(default=Path("data"), description="where the service keeps its SQLite files")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls: TlsFiles | None = Field(
        default=None, description="mTLS files (ca, cert, key) from `fedprint certs`; plaintext if unset"
    )

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Self:
        """Reads the YAML file (if any), then the environment, then ``overrides``."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text())
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"{path}: top level must be a mapping")
            data = loaded or {}
        # Explicit values (file, overrides) win over defaults; the environment sits between.
        return cls(**{**data, **overrides})


class NodeConfig(_ServiceConfig):
    """A gallery node (IAFIS or IDENT)."""

    node: Literal["iafis", "ident"]
    thresholds: Thresholds = Field(
        default_factory=lambda: calibrated_thresholds(),
        description="hit and review thresholds; the calibrated ones of fedprint/thresholds.yaml if unset",
    )
    batching: BatchingConfig = BatchingConfig()
    shortlist: ShortlistConfig = ShortlistConfig()
    gallery_cache: bool = Field(
        default=True,
        description="keep the encoded gallery in data_dir/<node>.cylinders so restarts map it, not re-encode",
    )
    device: str = Field(default="auto", description="torch device: auto, cpu, cuda, cuda:N")
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch; set when several nodes share a machine"
    )
    max_probes_per_request: int = Field(default=64, ge=1)
    max_results_limit: int = Field(default=100, ge=1)


class CoordinatorConfig(_ServiceConfig):
    """The federation coordinator."""

    iafis_address: str
    ident_address: str
    ice_address: str
    node_deadline_s: float = Field(default=20.0, gt=0, description="deadline of each node search")
    ice_deadline_s: float = Field(default=5.0, gt=0)
    max_candidates: int = Field(default=5, ge=1, description="candidates kept per node in a decision")
    policy_path: Path | None = Field(default=None, description="threat policy YAML; the bundled one if unset")
    authorized_oris: list[str] = Field(
        default_factory=list, description="ORIs allowed to submit; empty = any"
    )
    outbox_retry_initial_s: float = Field(default=0.5, gt=0)
    outbox_retry_max_s: float = Field(default=30.0, gt=0)

    @field_validator("authorized_oris")
    @classmethod
    def _oris_are_nine_chars(cls, oris: list[str]) -> list[str]:
        for ori in oris:
            if len(ori) != 9 or not ori.isalnum():
                raise ValueError(f"ORI {ori!r} must be nine letters or digits")
        return oris


class IceConfig(_ServiceConfig):
    """The ICE notification service (receiving side)."""


ConfigT = TypeVar("ConfigT", bound=_ServiceConfig)
