"""The store's tables. Times are seconds since the epoch (float), which every dialect stores as is."""

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Dialect, Index, String, Text, TypeDecorator, \
    UniqueConstraint
from sqlmodel import Field, SQLModel

from nlmm.paths import from_stored, to_stored
from nlmm.store.status import RunStatus

CHECKPOINT_KINDS = ("last", "best", "epoch")
# The metric that ranks checkpoints and runs: mean Recall@1 over the six retrieval directions.
BEST_METRIC_KEY = "mean_r1"


class RunsPath(TypeDecorator[str]):
    """A file path, kept relative to the runs folder when it lies inside it and read back as an
    absolute path under the current runs folder (see nlmm.paths). Comparisons in queries go
    through the same conversion, so `Checkpoint.path == some_absolute_path` matches."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else to_stored(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else from_stored(value)


class Run(SQLModel, table=True):
    __tablename__ = "runs"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    status: str = Field(default=RunStatus.QUEUED.value, index=True)
    # JSON of the run's nlmm.config.Config, as text: callers json.loads it into config_from_dict.
    config: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    data: str = ""
    device: str = ""
    pid: int | None = None
    host: str = ""
    created_at: float
    started_at: float | None = None  # when the current (possibly resumed) worker started
    # seconds the run's earlier workers ran: a new worker folds in the one before it
    elapsed_before: float = 0.0
    ended_at: float | None = None
    heartbeat_at: float | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    epochs_total: int | None = None
    steps_total: int | None = None  # known once the worker has sized the data
    step: int = 0
    # the 1-based epoch the latest step belongs to (0 before the first step)
    epoch: int = 0
    phase: str = ""  # what the worker is doing: training, evaluating dev, saving best.pt, ...
    processes: int = 1  # worker processes training the run (--nproc x --nnodes)
    best_metric: float | None = None
    parent: str | None = None
    log_path: str | None = Field(default=None, sa_type=RunsPath)


class Metric(SQLModel, table=True):
    """One scalar of a run at a step. A NaN value is stored as NULL (SQLite has no REAL NaN)."""

    __tablename__ = "metrics"
    # The unique index doubles as the lookup index: every query filters on run_id (+ key) and
    # ranges or orders on step, and a second identical index would only slow the writer.
    __table_args__ = (UniqueConstraint("run_id", "key", "step", name="uq_metrics_run_key_step"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id")
    step: int
    epoch: int
    key: str
    value: float | None = None
    time: float


# Steps per block of `MetricBlock`: long series are downsampled from blocks, short ones from rows.
BLOCK_STEPS = 64


class MetricBlock(SQLModel, table=True):
    """Sum and count of one metric over the steps [block * BLOCK_STEPS, (block + 1) * BLOCK_STEPS).

    Kept exact by the metric writer, which recomputes every block it touches from `metrics` in
    the same transaction, so a dashboard can average a million-row series by reading 1/64 of it.
    """

    __tablename__ = "metric_blocks"
    __table_args__ = (UniqueConstraint("run_id", "key", "block", name="uq_metric_blocks_run_key_block"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id")
    key: str
    block: int
    value_count: int  # non-NaN values
    value_sum: float  # their sum
    first_step: int


class Checkpoint(SQLModel, table=True):
    __tablename__ = "checkpoints"

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", index=True)
    step: int
    epoch: int
    path: str = Field(sa_type=RunsPath)
    kind: str
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    is_best: bool = False
    bytes: int = Field(default=0, sa_type=BigInteger)
    created_at: float


class SystemSample(SQLModel, table=True):
    """A GPU row (device_index set, gpu_* filled) or a host row (device_index NULL, cpu/ram filled)."""

    __tablename__ = "system_samples"
    __table_args__ = (Index("ix_system_samples_run_time", "run_id", "time"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int | None = Field(default=None, foreign_key="runs.id")
    time: float = Field(index=True)
    device_index: int | None = None
    gpu_util: float | None = None
    gpu_mem_used: int | None = Field(default=None, sa_type=BigInteger)
    gpu_mem_total: int | None = Field(default=None, sa_type=BigInteger)
    power_w: float | None = None
    temperature_c: float | None = None
    cpu_percent: float | None = None
    ram_used: int | None = Field(default=None, sa_type=BigInteger)
    ram_total: int | None = Field(default=None, sa_type=BigInteger)


class SchemaVersion(SQLModel, table=True):
    """A single row (id 1) holding the schema version the database was last migrated to."""

    __tablename__ = "schema_version"

    id: int = Field(default=1, primary_key=True)
    version: int
