"""What the CLI, the worker and the dashboard ask of the store.

Every function takes an optional engine (default: `get_engine()`) and returns plain values or
detached model objects that stay readable after their session has closed.
"""

from __future__ import annotations

import json
import math
import secrets
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Engine, and_, case, cast, delete, func, insert, text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from nlmm.errors import NlmmError
from nlmm.store.engine import read_session, write_session
from nlmm.store.liveness import LOST_AFTER_S, is_lost
from nlmm.store.models import (
    BEST_METRIC_KEY,
    BLOCK_STEPS,
    CHECKPOINT_KINDS,
    Checkpoint,
    Metric,
    MetricBlock,
    Run,
    SystemSample,
)
from nlmm.store.status import ACTIVE_STATUSES, ENDED_STATUSES, RunStatus

# DISTINCT over a million rows scans them all; hopping from key to next key is one index seek each.
_KEYS_SQL = text("""
WITH RECURSIVE keys(key) AS (
    SELECT min(key) FROM metrics WHERE run_id = :run_id
    UNION ALL
    SELECT (SELECT min(key) FROM metrics WHERE run_id = :run_id AND key > keys.key)
    FROM keys WHERE keys.key IS NOT NULL
)
SELECT key FROM keys WHERE key IS NOT NULL
""")


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


# ---- runs ---------------------------------------------------------------------------------------

def unique_run_name(prefix: str, engine: Engine | None = None) -> str:
    """`<prefix>-YYYYMMDD-HHMM-<4 hex>`, not yet used by any run."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    with read_session(engine) as session:
        while True:
            name = f"{prefix}-{stamp}-{secrets.token_hex(2)}"
            if session.exec(select(Run.id).where(Run.name == name)).first() is None:
                return name


def create_run(name: str, config: Mapping[str, Any], data: str, device: str, epochs_total: int | None,
               steps_total: int | None, parent: str | None = None, log_path: str | None = None,
               engine: Engine | None = None) -> Run:
    """Register a queued run; `config` is stored as JSON text."""
    run = Run(name=name, status=RunStatus.QUEUED.value, config=json.dumps(dict(config)), data=data,
              device=device, host=socket.gethostname(), created_at=time.time(),
              epochs_total=epochs_total, steps_total=steps_total, parent=parent, log_path=log_path)
    try:
        with write_session(engine) as session:
            session.add(run)
    except IntegrityError as exc:
        raise NlmmError(f"a run named {name!r} already exists; pick another name or delete it with "
                        f"`nlmm runs rm {name}`") from exc
    return run


def find_run(ref: str | int, engine: Engine | None = None) -> Run | None:
    """The run with id or name `ref`, None when there is none."""
    with read_session(engine) as session:
        run = None
        if isinstance(ref, int) or ref.isdigit():
            run = session.get(Run, int(ref))
        if run is None:
            run = session.exec(select(Run).where(Run.name == str(ref))).first()
    return run


def get_run(ref: str | int, engine: Engine | None = None) -> Run:
    """The run with id or name `ref`."""
    run = find_run(ref, engine=engine)
    if run is None:
        raise NlmmError(f"no run named {ref}; list runs with `nlmm runs ls`")
    return run


_UPDATABLE = frozenset(c.name for c in Run.__table__.columns) - {"id", "name", "status", "created_at"}


def update_run(run_id: int, engine: Engine | None = None, **fields: Any) -> None:
    """Set columns of a run (config as JSON text, totals, device, error, ...).

    Name, status and creation time have their own rules: use create_run and set_status.
    """
    unknown = set(fields) - _UPDATABLE
    if unknown:
        raise NlmmError(f"cannot update run fields {sorted(unknown)}; updatable: "
                        f"{', '.join(sorted(_UPDATABLE))}")
    if not fields:
        return
    with write_session(engine) as session:
        found = session.exec(update(Run).where(Run.id == run_id).values(**fields))
        if found.rowcount == 0:
            raise NlmmError(f"no run with id {run_id}; list runs with `nlmm runs ls`")


def latest_run(status: str | None = None, engine: Engine | None = None) -> Run | None:
    """The most recently created run, optionally only among runs with `status`."""
    query = select(Run).order_by(col(Run.created_at).desc(), col(Run.id).desc()).limit(1)
    if status is not None:
        query = query.where(Run.status == _checked_status(status))
    with read_session(engine) as session:
        return session.exec(query).first()


def _checked_status(status: str) -> str:
    """`status` as the column keeps it: the plain string of a RunStatus."""
    try:
        return RunStatus(status).value
    except ValueError:
        raise NlmmError(f"unknown run status {status!r}; use one of "
                        f"{', '.join(RunStatus)}") from None


def set_status(run_id: int, status: str, error: str | None = None, pid: int | None = None,
               host: str | None = None, processes: int | None = None,
               engine: Engine | None = None) -> None:
    """Move a run to `status`, stamping times; `pid` (on `host`, default this one) registers the
    worker process just started for it, training with `processes` ranks in all.

    Registering a worker, or `running`, begins a new stretch of the run: started_at and
    heartbeat_at become now and ended_at is cleared, after the stretch before it, when that one
    had ended, is added to elapsed_before (a resumed run's time adds up). An ended status stamps
    ended_at: now, or for `lost` the run's last sign of life.
    """
    now = time.time()
    values: dict[str, Any] = {"status": _checked_status(status)}
    if error is not None:
        values["error"] = error
    if pid is not None:
        values.update(pid=pid, host=host or socket.gethostname())
    if processes is not None:
        values["processes"] = processes
    if status in ENDED_STATUSES:
        values["phase"] = ""
    if pid is not None or status == RunStatus.RUNNING:
        ended = and_(col(Run.started_at).is_not(None), col(Run.ended_at).is_not(None))
        values.update(started_at=now, heartbeat_at=now, ended_at=None,
                      elapsed_before=Run.elapsed_before
                      + case((ended, Run.ended_at - Run.started_at), else_=0.0))
    if status in ENDED_STATUSES:
        values["ended_at"] = _last_sign_of_life(now) if status == RunStatus.LOST else now
    with write_session(engine) as session:
        found = session.exec(update(Run).where(Run.id == run_id).values(**values))
        if found.rowcount == 0:
            raise NlmmError(f"no run with id {run_id}; list runs with `nlmm runs ls`")


def _last_sign_of_life(now: float) -> Any:
    """When a lost run's worker was last known alive: its last heartbeat (the registration of
    its pid counts as one)."""
    return func.coalesce(Run.heartbeat_at, now)


def heartbeat(run_id: int, step: int | None = None, epoch: int | None = None,
              phase: str | None = None, engine: Engine | None = None) -> None:
    """Tell readers the run is alive (and how far it got, what it is doing) without logging a
    metric."""
    values: dict[str, Any] = {"heartbeat_at": time.time()}
    if step is not None:
        values["step"] = step
    if epoch is not None:
        values["epoch"] = epoch
    if phase is not None:
        values["phase"] = phase
    with write_session(engine) as session:
        session.exec(update(Run).where(Run.id == run_id).values(**values))


def mark_lost(timeout_s: float = LOST_AFTER_S, engine: Engine | None = None) -> list[int]:
    """Sweep: mark `lost` the runs that `is_lost` judges so (active, registered on this host,
    silent for `timeout_s`, no live worker); returns their ids.

    The one store call that turns silence into `lost`: readers (`list_runs`, the dash's polling)
    never write, so the CLI and the dash call this explicitly before they list runs. Runs of
    other hosts are left alone: their processes cannot be checked from here.
    """
    now = time.time()
    active_here = select(Run).where(col(Run.status).in_(ACTIVE_STATUSES),
                                    Run.host == socket.gethostname())
    with read_session(engine) as session:
        candidates = session.exec(active_here).all()
    lost = [run.id for run in candidates if is_lost(run, now, timeout_s)]
    if lost:
        last_sign = func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)
        with write_session(engine) as session:
            # Re-check status and heartbeat inside the write lock: the run may have ended or
            # beaten since the read.
            session.exec(update(Run)
                         .where(col(Run.id).in_(lost), col(Run.status).in_(ACTIVE_STATUSES),
                                last_sign < now - timeout_s)
                         .values(status=RunStatus.LOST.value,
                                 ended_at=_last_sign_of_life(time.time()),
                                 error="the worker process disappeared without reporting"))
    return lost


def list_runs(status: str | None = None, name_like: str | None = None,
              engine: Engine | None = None) -> list[Run]:
    """Runs, newest first. Reads only: a worker that died unseen shows as lost once `mark_lost`
    has swept."""
    query = select(Run).order_by(col(Run.created_at).desc(), col(Run.id).desc())
    if status is not None:
        query = query.where(Run.status == _checked_status(status))
    if name_like:
        query = query.where(col(Run.name).contains(name_like, autoescape=True))
    with read_session(engine) as session:
        return list(session.exec(query).all())


def delete_run(ref: str | int, engine: Engine | None = None) -> Run:
    """Delete a run and all its rows (metrics, checkpoints, system samples); returns the run.

    Files under the run's folder are the caller's to remove.
    """
    run = get_run(ref, engine=engine)
    with write_session(engine) as session:
        for model in (Metric, MetricBlock, Checkpoint, SystemSample):
            session.exec(delete(model).where(model.run_id == run.id))
        session.exec(delete(Run).where(Run.id == run.id))
    return run


# ---- metrics ------------------------------------------------------------------------------------

def metric_keys(run_id: int, engine: Engine | None = None) -> list[str]:
    """The metric keys logged by a run, sorted."""
    with read_session(engine) as session:
        return _keys(session, run_id)


def _keys(session: Session, run_id: int) -> list[str]:
    return [key for (key,) in session.exec(_KEYS_SQL, params={"run_id": run_id})]


def latest_metrics(run_id: int, keys: Iterable[str] | None = None,
                   engine: Engine | None = None) -> dict[str, float]:
    """The value of each key at its highest step (all keys of the run when `keys` is None)."""
    return {key: value for key, (_, value) in latest_points(run_id, keys, engine).items()}


def latest_points(run_id: int, keys: Iterable[str] | None = None,
                  engine: Engine | None = None) -> dict[str, tuple[int, float]]:
    """(step, value) of each key at its highest step: a figure shown beside a live step count
    says which step it is from."""
    with read_session(engine) as session:
        wanted = list(keys) if keys is not None else _keys(session, run_id)
        latest: dict[str, tuple[int, float]] = {}
        for key in wanted:
            row = session.exec(select(Metric.step, Metric.value)
                               .where(Metric.run_id == run_id, Metric.key == key)
                               .order_by(col(Metric.step).desc()).limit(1)).first()
            if row is not None:
                latest[key] = (row[0], _nan_if_none(row[1]))
    return latest


def best_metric(run_id: int, key: str = BEST_METRIC_KEY, engine: Engine | None = None) -> float | None:
    """The highest value a run logged for `key` (None when it never logged it)."""
    with read_session(engine) as session:
        return session.exec(select(func.max(Metric.value))
                            .where(Metric.run_id == run_id, Metric.key == key)).one()


def _series(session: Session, run_id: int, key: str, max_points: int) -> list[tuple[int, float]]:
    of_series = (Metric.run_id == run_id, Metric.key == key)
    head = session.exec(select(Metric.step, Metric.value).where(*of_series)
                        .order_by(col(Metric.step)).limit(max_points + 1)).all()
    if len(head) <= max_points:
        return [(step, _nan_if_none(value)) for step, value in head]
    lo = head[0][0]
    hi = session.exec(select(func.max(Metric.step)).where(*of_series)).one()
    if hi - lo + 1 <= BLOCK_STEPS * max_points:
        # Few enough rows to average directly: buckets of equal step ranges.
        bucket = (cast(Metric.step, BigInteger) - lo) * max_points // (hi - lo + 1)
        first = func.min(Metric.step)
        query = select(first, func.avg(Metric.value)).where(*of_series).group_by(bucket).order_by(first)
    else:
        # Long series: whole blocks per bucket, read from their running sums (1/BLOCK_STEPS of the rows).
        low_block, high_block = lo // BLOCK_STEPS, hi // BLOCK_STEPS
        blocks = high_block - low_block + 1
        bucket = (cast(MetricBlock.block, BigInteger) - low_block) * max_points // blocks
        first = func.min(MetricBlock.first_step)
        mean = func.sum(MetricBlock.value_sum) / func.nullif(func.sum(MetricBlock.value_count), 0)
        query = (select(first, mean)
                 .where(MetricBlock.run_id == run_id, MetricBlock.key == key)
                 .group_by(bucket).order_by(first))
    points = [(step, _nan_if_none(value)) for step, value in session.exec(query)]
    # The last bucket is placed at its last step so that the curve reaches the run's latest step.
    points[-1] = (hi, points[-1][1])
    return points


def metric_series(run_id: int, key: str, max_points: int = 500,
                  engine: Engine | None = None) -> list[tuple[int, float]]:
    """(step, value) points of one metric, at most `max_points`, ordered by step.

    Up to `max_points` rows come back as logged. A longer series is cut into `max_points` equal
    ranges of steps, each giving (its first step, the mean of its values); beyond
    BLOCK_STEPS * max_points steps the range edges snap to whole blocks of BLOCK_STEPS steps.
    The last point is placed at the series' last step. NaN values are left out of a mean (NaN
    when a range holds only NaN).
    """
    if max_points < 2:
        raise NlmmError(f"max_points must be at least 2, got {max_points}")
    with read_session(engine) as session:
        return _series(session, run_id, key, max_points)


def metric_series_many(run_ids: Sequence[int], key: str, max_points: int = 500,
                       engine: Engine | None = None) -> dict[int, list[tuple[int, float]]]:
    """`metric_series` of several runs at once (for overlays), keyed by run id."""
    if max_points < 2:
        raise NlmmError(f"max_points must be at least 2, got {max_points}")
    with read_session(engine) as session:
        return {run_id: _series(session, run_id, key, max_points) for run_id in run_ids}


# ---- checkpoints --------------------------------------------------------------------------------

def record_checkpoint(run_id: int, step: int, epoch: int, path: str, kind: str,
                      metrics: Mapping[str, Any], is_best: bool, bytes: int,
                      engine: Engine | None = None) -> Checkpoint:
    """Register a checkpoint file.

    A file saved again at the same path (`last`, `best`) replaces its earlier row, since the old
    contents are gone. A new best clears the previous best flag of the run and, when its metrics
    hold `mean_r1`, becomes the run's best_metric.
    """
    if kind not in CHECKPOINT_KINDS:
        raise NlmmError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(CHECKPOINT_KINDS)}")
    checkpoint = Checkpoint(run_id=run_id, step=step, epoch=epoch, path=str(path), kind=kind,
                            metrics=dict(metrics), is_best=is_best, bytes=bytes, created_at=time.time())
    with write_session(engine) as session:
        session.exec(delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.path == str(path)))
        if is_best:
            session.exec(update(Checkpoint).where(Checkpoint.run_id == run_id, col(Checkpoint.is_best))
                         .values(is_best=False))
            if BEST_METRIC_KEY in metrics:
                session.exec(update(Run).where(Run.id == run_id)
                             .values(best_metric=float(metrics[BEST_METRIC_KEY])))
        session.add(checkpoint)
    return checkpoint


def list_checkpoints(run_id: int, engine: Engine | None = None) -> list[Checkpoint]:
    """A run's checkpoints, oldest step first."""
    with read_session(engine) as session:
        return list(session.exec(select(Checkpoint).where(Checkpoint.run_id == run_id)
                                 .order_by(col(Checkpoint.step), col(Checkpoint.id))).all())


def best_checkpoint(run_id: int, engine: Engine | None = None) -> Checkpoint | None:
    with read_session(engine) as session:
        return session.exec(select(Checkpoint)
                            .where(Checkpoint.run_id == run_id, col(Checkpoint.is_best))
                            .order_by(col(Checkpoint.id).desc())).first()


def last_checkpoint(run_id: int, engine: Engine | None = None) -> Checkpoint | None:
    """The checkpoint at the highest step (the newest one when several share it)."""
    with read_session(engine) as session:
        return session.exec(select(Checkpoint).where(Checkpoint.run_id == run_id)
                            .order_by(col(Checkpoint.step).desc(), col(Checkpoint.id).desc())).first()


# ---- system samples -----------------------------------------------------------------------------

_SAMPLE_COLUMNS = tuple(c.name for c in SystemSample.__table__.columns if c.name != "id")


def add_system_samples(rows: Iterable[Mapping[str, Any]], engine: Engine | None = None) -> int:
    """Insert sample rows (dicts of SystemSample columns; `time` defaults to now); returns the count."""
    now = time.time()
    full = []
    for row in rows:
        unknown = set(row) - set(_SAMPLE_COLUMNS)
        if unknown:
            raise NlmmError(f"system sample has unknown fields {sorted(unknown)}; use "
                            f"{', '.join(_SAMPLE_COLUMNS)}")
        values = dict.fromkeys(_SAMPLE_COLUMNS)
        values.update(row)
        if values["time"] is None:
            values["time"] = now
        full.append(values)
    if full:
        with write_session(engine) as session:
            session.exec(insert(SystemSample), params=full)
    return len(full)


def system_samples(run_id: int | None = None, since: float | None = None, limit: int = 1000,
                   engine: Engine | None = None) -> list[SystemSample]:
    """The latest `limit` samples (of one run, or of all when run_id is None), oldest first."""
    query = (select(SystemSample).order_by(col(SystemSample.time).desc(), col(SystemSample.id).desc())
             .limit(limit))
    if run_id is not None:
        query = query.where(SystemSample.run_id == run_id)
    if since is not None:
        query = query.where(SystemSample.time >= since)
    with read_session(engine) as session:
        return list(reversed(session.exec(query).all()))


def lineage(run: Run) -> tuple[list[Run], str | None]:
    """The runs `run` descends from, the first one first, and `run` last; with the name of an
    ancestor that was removed from the store (the chain stops below it), else None."""
    chain = [run]
    while chain[0].parent:
        parent = find_run(chain[0].parent)
        if parent is None:
            return chain, chain[0].parent
        if any(r.id == parent.id for r in chain):  # a removed parent's name taken by a descendant
            break
        chain.insert(0, parent)
    return chain, None
