"""Configuration of a gallery node. Every node runs the same server with this configuration;
``node`` only names it (its data files, its logs, its statistics).

A node runs in one of three roles (``role``): ``standalone``, one process holding the whole
gallery; or sharded, a ``router`` that holds no data and calls its ``shards`` (one address per
partition, in partition order), in front of ``shard`` processes that each hold partition
``shard.index`` of ``shard.count`` (helm/README.md, "The router/shard contract")."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, Field, model_validator

from calibration.learning import LearningPolicy
from calibration.thresholds import Thresholds, calibrated_thresholds
from fedprint.settings import ServiceSettings
from nodes.gallery.partition import WHOLE, Partition


class BatchingConfig(BaseModel):
    """Dynamic micro-batching of concurrent Identify calls into one device call."""

    max_batch: int = Field(default=16, ge=1, description="most probes scored in one device call")
    max_wait_ms: float = Field(default=5.0, ge=0.0, description="longest a probe waits for companions")
    # Eight full batches: past that, a probe would wait behind minutes of work on a large gallery,
    # beyond any caller's deadline; refusing it at once lets the caller retry elsewhere or later.
    max_queue: int = Field(
        default=128,
        ge=1,
        description="most probes waiting for a batch; an Identify call that does not fit "
        "gets RESOURCE_EXHAUSTED",
    )


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
    # Two measurements bound it (docs/accuracy.md, "Shortlist"; docs/bench/). Mates kept: on
    # 20,000 hard subjects with half the probes plain (6,000 probes), 99.02 % at 200, 99.38 % at
    # 300, 99.55 % at 500; on 100,000 realistic subjects every mate from K = 50 on. Time, on two
    # CPU cores against a realistic 100,000-subject gallery served from its mapped cache: one
    # Identify call of 16 probes took 11.2 s at K = 200, and 16 to 25 s at K = 300, past the
    # coordinator's 20 s node deadline in the slower runs. A late node makes every decision
    # incomplete, so 200; a node with more arithmetic (a GPU) should raise it. So should a node
    # whose probes are mostly plain against rolled enrolments, where it can afford it: 99.5 % of
    # the hard preset's mates takes K = 400, and at 20,000 subjects one call of 16 probes then took
    # 6.5-6.9 s (docs/bench/batching_hard20k.json; the 100,000-subject times predate that faster
    # scoring and were not measured again).
    candidates: int = Field(default=200, ge=1, description="subjects per probe that full MCC scores")


class ShardConfig(BaseModel):
    """Which partition of the node's gallery a shard holds."""

    count: int = Field(ge=1, description="how many partitions the node's gallery has")
    index: int | None = Field(
        default=None,
        ge=0,
        description="the partition this shard holds, 0..count-1 (per StatefulSet: FEDPRINT_SHARD__INDEX)",
    )


class NodeConfig(ServiceSettings):
    """A gallery node (IAFIS, IDENT, or any other record model on the shared server)."""

    node: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}\z", description="the node's name (files, logs, stats)")
    thresholds: Thresholds = Field(
        default_factory=lambda: calibrated_thresholds(),
        description="hit and review thresholds; the calibrated ones of calibration/thresholds.yaml if unset",
    )
    learning: LearningPolicy = Field(
        default_factory=LearningPolicy,
        description="how the thresholds follow impostor tails learned from the node's own gallery "
        "(calibration.learning); a standalone node learns, a router and its shards judge by "
        "`thresholds` as configured",
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
    role: Literal["standalone", "router", "shard"] = Field(
        default="standalone",
        description="standalone: the whole gallery in one process; router: fans out to `shards`; "
        "shard: holds partition `shard.index` of `shard.count`",
    )
    shards: list[str] = Field(
        default_factory=list,
        description="a router's shards: one host:port per partition, in partition order",
    )
    shard: ShardConfig | None = Field(default=None, description="a shard's partition")
    shard_deadline_s: float = Field(
        default=20.0,
        gt=0,
        description="a router's deadline for its shards when its caller sets none",
    )
    # A day: reviews are reported overdue after four hours (the coordinator's review_overdue_s),
    # and an examiner claims and decides a review well within a day of its opening.
    release_window_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="how long after returning a subject as the deciding candidate in the review or hit "
        "band the node releases its prints and record (GetSubject) to that caller, for that probe",
    )
    release_max_records: int = Field(
        default=100_000,
        ge=1,
        description="most returned candidates the node remembers for release; the oldest go first",
    )
    sync_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="how often a node reads the enrolments and removals other processes wrote to its store",
    )

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Self:
        if self.batching.max_queue < self.max_probes_per_request:
            raise ValueError(
                f"batching.max_queue ({self.batching.max_queue}) is below max_probes_per_request "
                f"({self.max_probes_per_request}): a request of that many probes could never be queued"
            )
        return self

    @model_validator(mode="after")
    def _role_settings(self) -> Self:
        if self.role == "router":
            if not self.shards:
                raise ValueError("a router needs `shards`: one host:port per partition")
            if self.shard is not None:
                raise ValueError("a router holds no partition: drop `shard`")
        elif self.role == "shard":
            if self.shard is None or self.shard.index is None:
                raise ValueError(
                    "a shard needs `shard: {count, index}` "
                    "(the index from FEDPRINT_SHARD__INDEX, per StatefulSet)"
                )
            if self.shard.index >= self.shard.count:
                raise ValueError(
                    f"shard.index {self.shard.index} is not below shard.count {self.shard.count}"
                )
            if self.shards:
                raise ValueError("a shard calls no shards: drop `shards`")
        elif self.shards or self.shard is not None:
            raise ValueError("`shards` belongs to a router and `shard` to a shard: set `role`")
        return self

    @property
    def partition(self) -> Partition:
        """The part of the gallery this process holds: a shard's partition, or the whole gallery."""
        if self.shard is None or self.shard.index is None:
            return WHOLE
        return Partition(self.shard.index, self.shard.count)

    @property
    def cache_name(self) -> str:
        """The encoded-gallery cache directory's name in ``data_dir``: one per partition, since the
        shards of a node may share a data directory (as they do on one machine)."""
        if self.role == "shard":
            return f"{self.node}-shard-{self.partition.index}-of-{self.partition.count}.cylinders"
        return f"{self.node}.cylinders"
