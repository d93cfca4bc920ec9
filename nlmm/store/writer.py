"""Batched, idempotent metric writes for the training worker.

`log()` only appends to a list; rows reach the database in one transaction per flush, so the
per-step cost is a few microseconds however slow the disk. Rows are upserted on
(run, key, step): a resumed run that replays steps overwrites them instead of duplicating them.
The same transaction recomputes the MetricBlock sums of the blocks it wrote to, from the rows
now stored, so the blocks stay exact through replays.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import BigInteger, Dialect, Engine, Executable, bindparam, cast, func, select, update

from nlmm.errors import NlmmError
from nlmm.store.engine import get_engine
from nlmm.store.models import BLOCK_STEPS, Metric, MetricBlock, Run

_CONFLICT_COLUMNS = ("run_id", "key", "step")
# The order of the tuples that log() buffers.
_ROW_COLUMNS = ("run_id", "step", "epoch", "key", "value", "time")


def _dialect_insert(dialect: Dialect) -> Callable[[Any], Any]:
    if dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise NlmmError(f"the store cannot write metrics to a {dialect.name} database; use SQLite or "
                        f"PostgreSQL in NLMM_DB_URL")
    return insert


def metric_upsert(dialect: Dialect) -> tuple[str, Callable[[list[tuple[Any, ...]]], list[Any]]]:
    """SQL of an INSERT into metrics that replaces value, epoch and time when (run, key, step)
    exists, compiled once for `dialect`, and the function that turns buffered row tuples into
    its driver parameters.

    The rows go straight to the driver's executemany: SQLAlchemy's per-row parameter processing
    costs twice as much as SQLite's insert itself, and these columns need no type conversion.
    """
    # inline(): no RETURNING of the new ids, which nobody reads.
    stmt = _dialect_insert(dialect)(Metric.__table__).inline()
    stmt = stmt.on_conflict_do_update(
        index_elements=list(_CONFLICT_COLUMNS),
        set_={"value": stmt.excluded.value, "epoch": stmt.excluded.epoch, "time": stmt.excluded.time})
    compiled = stmt.compile(dialect=dialect, column_keys=list(_ROW_COLUMNS))
    if compiled.positional:
        pick = operator.itemgetter(*(_ROW_COLUMNS.index(name) for name in compiled.positiontup))
        return str(compiled), lambda rows: list(map(pick, rows))
    return str(compiled), lambda rows: [dict(zip(_ROW_COLUMNS, row)) for row in rows]


def block_refresh(dialect: Dialect) -> Executable:
    """Recompute the MetricBlock rows of one run and key over the steps [:first, :last] from
    `metrics`; parameters run_id, key, first, last (block-aligned)."""
    block = cast(Metric.step, BigInteger) // BLOCK_STEPS
    rows = (select(Metric.run_id, Metric.key, block, func.count(Metric.value),
                   func.coalesce(func.sum(Metric.value), 0.0), func.min(Metric.step))
            .where(Metric.run_id == bindparam("run_id"), Metric.key == bindparam("key"),
                   Metric.step.between(bindparam("first"), bindparam("last")))
            .group_by(Metric.run_id, Metric.key, block))
    stmt = _dialect_insert(dialect)(MetricBlock.__table__).from_select(
        ["run_id", "key", "block", "value_count", "value_sum", "first_step"], rows)
    return stmt.on_conflict_do_update(
        index_elements=["run_id", "key", "block"],
        set_={"value_count": stmt.excluded.value_count, "value_sum": stmt.excluded.value_sum,
              "first_step": stmt.excluded.first_step})


def touched_blocks(run_id: int, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """block_refresh parameters covering every block that `rows` wrote to, one range per key."""
    spans: dict[str, tuple[int, int]] = {}
    for _, step, _, key, _, _ in rows:
        low, high = spans.get(key, (step, step))
        spans[key] = (min(low, step), max(high, step))
    return [{"run_id": run_id, "key": key, "first": low // BLOCK_STEPS * BLOCK_STEPS,
             "last": (high // BLOCK_STEPS + 1) * BLOCK_STEPS - 1} for key, (low, high) in spans.items()]


class MetricWriter:
    """Buffers a run's scalars and writes them in batches, updating the run's heartbeat each time.

    Not thread-safe: one writer belongs to the thread that logs. Values are converted with
    `float()`, so passing a device tensor costs a device sync; pass Python floats.
    """

    def __init__(self, run_id: int, engine: Engine | None = None, flush_rows: int = 512,
                 flush_seconds: float = 2.0) -> None:
        self.run_id = run_id
        self.engine = engine or get_engine()
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._upsert_sql, self._driver_params = metric_upsert(self.engine.dialect)
        self._block_refresh = block_refresh(self.engine.dialect)
        self._rows: list[tuple[Any, ...]] = []
        self._first_buffered_at = 0.0
        self._step = 0
        self._epoch = 0

    def log(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Queue `values` for `step`; writes only when the buffer is full or old enough."""
        if not self._rows:
            self._first_buffered_at = time.monotonic()
        now, run_id = time.time(), self.run_id
        self._rows += [(run_id, step, epoch, key, _finite_or_none(value), now)
                       for key, value in values.items()]
        self._step, self._epoch = step, epoch
        if (len(self._rows) >= self.flush_rows
                or time.monotonic() - self._first_buffered_at >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows and the heartbeat in one transaction; keeps them on failure."""
        if not self._rows:
            return
        rows = self._rows
        with self.engine.begin() as conn:
            conn.exec_driver_sql(self._upsert_sql, self._driver_params(rows))
            conn.execute(self._block_refresh, touched_blocks(self.run_id, rows))
            conn.execute(update(Run).where(Run.id == self.run_id)
                         .values(heartbeat_at=time.time(), step=self._step, epoch=self._epoch))
        self._rows = []

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _finite_or_none(value: float) -> float | None:
    number = float(value)
    # SQLite silently turns NaN into NULL; doing it here makes every dialect store the same thing.
    return None if number != number else number
