"""Configuration of a gallery node. Every node runs the same server with this configuration;
``node`` only names it (its data files, its logs, its statistics)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from evaluation.calibration import Thresholds, calibrated_thresholds
from fedprint.settings import ServiceSettings


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


class NodeConfig(ServiceSettings):
    """A gallery node (IAFIS, IDENT, or any other record model on the shared server)."""

    node: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}\z", description="the node's name (files, logs, stats)")
    thresholds: Thresholds = Field(
        default_factory=lambda: calibrated_thresholds(),
        description="hit and review thresholds; the calibrated ones of evaluation/thresholds.yaml if unset",
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
