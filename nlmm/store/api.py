"""The store's public names, one import away from `nlmm.store` (see its __init__)."""

from nlmm.paths import default_db_url, run_dir, runs_dir
from nlmm.store.engine import create_store_engine, current_url, get_engine, read_session, write_session
from nlmm.store.migrations import LATEST_VERSION, MIGRATIONS, Migration, migrate, schema_version
from nlmm.store.liveness import worker_alive
from nlmm.store.models import (
    BEST_METRIC_KEY,
    BLOCK_STEPS,
    CHECKPOINT_KINDS,
    Checkpoint,
    Metric,
    MetricBlock,
    Run,
    SchemaVersion,
    SystemSample,
)
from nlmm.store.progress import elapsed_seconds, eta_seconds, steps_cap_note
from nlmm.store.status import ACTIVE_STATUSES, ENDED_STATUSES, RunStatus
from nlmm.store.queries import (
    add_system_samples,
    best_checkpoint,
    best_metric,
    create_run,
    delete_run,
    find_run,
    lineage,
    get_run,
    heartbeat,
    last_checkpoint,
    latest_metrics,
    latest_points,
    latest_run,
    list_checkpoints,
    list_runs,
    mark_lost,
    metric_keys,
    metric_series,
    metric_series_many,
    record_checkpoint,
    set_status,
    system_samples,
    unique_run_name,
    update_run,
)
from nlmm.store.writer import MetricWriter
from nlmm.units import hms

__all__ = [
    "ACTIVE_STATUSES", "BEST_METRIC_KEY", "BLOCK_STEPS", "CHECKPOINT_KINDS", "ENDED_STATUSES",
    "LATEST_VERSION", "MIGRATIONS", "Checkpoint", "Metric", "MetricBlock",
    "MetricWriter", "Migration", "Run", "RunStatus", "SchemaVersion", "SystemSample",
    "add_system_samples", "best_checkpoint", "best_metric", "create_run", "create_store_engine",
    "current_url", "default_db_url", "delete_run", "elapsed_seconds", "eta_seconds", "find_run",
    "get_engine", "get_run", "heartbeat", "hms", "last_checkpoint", "latest_metrics",
    "latest_points", "latest_run", "lineage", "list_checkpoints", "list_runs", "mark_lost", "metric_keys",
    "metric_series", "metric_series_many", "migrate", "read_session", "record_checkpoint",
    "run_dir", "runs_dir", "schema_version", "set_status", "steps_cap_note", "system_samples",
    "unique_run_name", "update_run", "worker_alive", "write_session",
]
