"""The store on real SQLite files: schema, batched writes, downsampling, lifecycle queries."""

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import event, text

from nlmm import paths
from nlmm.errors import NlmmError
from nlmm.store import (
    ACTIVE_STATUSES,
    BLOCK_STEPS,
    ENDED_STATUSES,
    LATEST_VERSION,
    MIGRATIONS,
    Migration,
    MetricWriter,
    RunStatus,
    add_system_samples,
    best_checkpoint,
    best_metric,
    create_run,
    current_url,
    delete_run,
    elapsed_seconds,
    eta_seconds,
    find_run,
    get_engine,
    get_run,
    last_checkpoint,
    latest_metrics,
    latest_run,
    list_checkpoints,
    list_runs,
    mark_lost,
    metric_keys,
    metric_series,
    metric_series_many,
    migrate,
    read_session,
    record_checkpoint,
    set_status,
    system_samples,
    unique_run_name,
    update_run,
    worker_alive,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "nlmm.db"


@pytest.fixture
def engine(db_path: Path):
    return get_engine(f"sqlite:///{db_path}")


def _new_run(engine, name: str = "r", **kw):
    return create_run(name, {"train": {"lr": 1e-3}}, "data/flickr8k", "cpu", epochs_total=2,
                      steps_total=100, engine=engine, **kw)


def _raw(db_path: Path, sql: str, *args):
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_paths_follow_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("NLMM_DB_URL", raising=False)
    monkeypatch.setenv("NLMM_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert paths.runs_dir() == tmp_path / "elsewhere"
    assert paths.default_db_url() == f"sqlite:///{tmp_path / 'elsewhere' / 'nlmm.db'}"
    assert paths.run_dir("flickr8k-x") == tmp_path / "elsewhere" / "flickr8k-x"
    monkeypatch.setenv("NLMM_DB_URL", "postgresql://u@h/db")
    assert paths.default_db_url() == "postgresql://u@h/db"
    monkeypatch.delenv("NLMM_RUNS_DIR")
    monkeypatch.chdir(tmp_path)
    assert paths.runs_dir() == tmp_path / "runs"
    # A relative SQLite URL is handed to child processes as an absolute one.
    monkeypatch.setenv("NLMM_DB_URL", "sqlite:///sub/x.db")
    assert current_url() == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    monkeypatch.setenv("NLMM_DB_URL", "postgresql://u:secret@h/db")
    assert current_url() == "postgresql://u:secret@h/db"


def test_schema_wal_busy_timeout_and_version(engine, db_path):
    tables = {name for (name,) in _raw(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "metrics", "metric_blocks", "checkpoints", "system_samples", "schema_version"} <= tables
    # WAL is a property of the file, so a plain sqlite3 connection sees it too.
    assert _raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert _raw(db_path, "SELECT id, version FROM schema_version") == [(1, LATEST_VERSION)]
    with read_session(engine) as session:
        assert session.exec(text("PRAGMA busy_timeout")).scalar() == 30000
        assert session.exec(text("PRAGMA foreign_keys")).scalar() == 1
    metric_indexes = _raw(db_path, "PRAGMA index_list(metrics)")
    unique_cols = [[c[2] for c in _raw(db_path, f"PRAGMA index_info('{ix[1]}')")] for ix in metric_indexes if ix[2]]
    assert ["run_id", "key", "step"] in unique_cols


def test_writes_begin_immediate_and_reads_deferred(engine):
    statements: list[str] = []
    listener = lambda conn, cursor, stmt, *a: statements.append(stmt)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        run = _new_run(engine)
        get_run(run.id, engine=engine)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    begins = [s for s in statements if s.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]


def test_newer_schema_version_is_refused(tmp_path):
    # A database stamped by a newer nlmm, made by hand.
    db = tmp_path / "newer.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1, ?)", (LATEST_VERSION + 5,))
    conn.commit()
    conn.close()
    for _ in range(2):  # a refused store is not cached as opened
        with pytest.raises(NlmmError, match=f"schema version {LATEST_VERSION + 5} but this nlmm knows "
                                            f"versions up to {LATEST_VERSION}; upgrade nlmm"):
            get_engine(f"sqlite:///{db}")
    assert _raw(db, "SELECT name FROM sqlite_master WHERE type='table'") == [("schema_version",)]


def test_pending_migration_applies_once_in_order(engine, db_path):
    calls = []

    def add_note_column(conn):
        calls.append("v2")
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN note VARCHAR")

    upgraded = (*MIGRATIONS, Migration(LATEST_VERSION + 1, "add runs.note", add_note_column))
    assert migrate(engine, upgraded) == LATEST_VERSION + 1
    assert migrate(engine, upgraded) == LATEST_VERSION + 1
    assert calls == ["v2"]
    assert "note" in [c[1] for c in _raw(db_path, "PRAGMA table_info(runs)")]
    assert _raw(db_path, "SELECT version FROM schema_version") == [(LATEST_VERSION + 1,)]


def test_writer_rows_round_trip_exactly(engine, db_path):
    run = _new_run(engine)
    rng = random.Random(0)
    expected = {}
    with MetricWriter(run.id, engine=engine, flush_rows=300, flush_seconds=60) as writer:
        for step in range(1000):
            values = {"loss": rng.random(), "lr/fast": rng.random() * 1e-3, "i2t_r1": rng.random() * 100}
            writer.log(step, step // 400, values)
            expected.update({(key, step): (step // 400, v) for key, v in values.items()})
    rows = _raw(db_path, "SELECT key, step, epoch, value FROM metrics WHERE run_id = ?", run.id)
    assert {(k, s): (e, v) for k, s, e, v in rows} == expected
    assert len(rows) == len(expected) == 3000
    assert metric_keys(run.id, engine=engine) == ["i2t_r1", "loss", "lr/fast"]
    latest = latest_metrics(run.id, engine=engine)
    assert latest == {key: expected[(key, 999)][1] for key in ("loss", "lr/fast", "i2t_r1")}
    assert best_metric(run.id, "i2t_r1", engine=engine) == max(v for (k, _), (_, v) in expected.items() if k == "i2t_r1")
    heartbeat_run = get_run(run.id, engine=engine)
    assert (heartbeat_run.step, heartbeat_run.epoch) == (999, 2) and heartbeat_run.heartbeat_at is not None


def test_writer_buffers_until_flush_conditions(engine, db_path):
    run = _new_run(engine)
    inserts: list[str] = []
    listener = lambda conn, cursor, stmt, *a: inserts.append(stmt) if "INSERT INTO metrics" in stmt else None  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        writer = MetricWriter(run.id, engine=engine, flush_rows=10, flush_seconds=0.3)
        for step in range(4):
            writer.log(step, 0, {"a": 1.0, "b": 2.0})
        assert inserts == [] and _raw(db_path, "SELECT count(*) FROM metrics") == [(0,)]
        writer.log(4, 0, {"a": 1.0, "b": 2.0})  # 10 rows: the buffer is full
        assert len(inserts) == 1 and _raw(db_path, "SELECT count(*) FROM metrics") == [(10,)]
        writer.log(5, 0, {"a": 1.0})
        time.sleep(0.35)
        assert len(inserts) == 1
        writer.log(6, 0, {"a": 1.0})  # the oldest buffered row is now older than flush_seconds
        assert len(inserts) == 2 and _raw(db_path, "SELECT count(*) FROM metrics") == [(12,)]
        writer.log(7, 0, {"a": 1.0})
        writer.close()
        assert len(inserts) == 3 and _raw(db_path, "SELECT count(*) FROM metrics") == [(13,)]
    finally:
        event.remove(engine, "before_cursor_execute", listener)


def test_replayed_step_upserts_one_row(engine, db_path):
    run = _new_run(engine)
    with MetricWriter(run.id, engine=engine) as writer:
        writer.log(7, 0, {"loss": 1.5})
    with MetricWriter(run.id, engine=engine) as writer:  # a resumed run replays step 7
        writer.log(7, 1, {"loss": 0.25})
        writer.log(7, 1, {"loss": 0.125})  # and twice within one batch
    assert _raw(db_path, "SELECT step, epoch, value FROM metrics WHERE key = 'loss'") == [(7, 1, 0.125)]


def test_nan_is_stored_and_read_back_as_nan(engine):
    run = _new_run(engine)
    with MetricWriter(run.id, engine=engine) as writer:
        writer.log(0, 0, {"loss": 2.0})
        writer.log(1, 0, {"loss": float("nan"), "inf": float("inf")})
    assert math.isnan(latest_metrics(run.id, ["loss"], engine=engine)["loss"])
    assert latest_metrics(run.id, ["inf", "absent"], engine=engine) == {"inf": math.inf}
    series = metric_series(run.id, "loss", engine=engine)
    assert series[0] == (0, 2.0) and series[1][0] == 1 and math.isnan(series[1][1])


def _reference_buckets(steps_values, max_points, block_steps=1):
    """(first step, mean of non-NaN values or NaN) per bucket = (unit - first unit) * max_points // units,
    with unit = step // block_steps; the last point moved to the last step."""
    lo, hi = steps_values[0][0] // block_steps, steps_values[-1][0] // block_steps
    buckets: dict[int, list] = {}
    for step, value in steps_values:
        buckets.setdefault((step // block_steps - lo) * max_points // (hi - lo + 1), []).append((step, value))
    points = []
    for _, members in sorted(buckets.items()):
        finite = [v for _, v in members if not math.isnan(v)]
        points.append((min(s for s, _ in members), sum(finite) / len(finite) if finite else math.nan))
    points[-1] = (steps_values[-1][0], points[-1][1])
    return points


def _assert_same_points(series, reference):
    assert [s for s, _ in series] == [s for s, _ in reference]
    assert [math.isnan(v) for _, v in series] == [math.isnan(v) for _, v in reference]
    assert [v for _, v in series if not math.isnan(v)] == pytest.approx(
        [v for _, v in reference if not math.isnan(v)], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("span, block_steps", [(15_000, 1), (250_000, BLOCK_STEPS)], ids=["rows", "blocks"])
def test_series_downsampled_in_sql_matches_python_reference(engine, span, block_steps):
    run = _new_run(engine)
    rng = random.Random(1)
    # Irregular steps with gaps, so buckets hold different counts and some are empty. 300 points
    # over 15k steps average rows directly (15k < 300 * BLOCK_STEPS); over 250k, whole blocks.
    steps = sorted(rng.sample(range(3, span), 10_000))
    rows = [(s, rng.gauss(0.0, 1.0)) for s in steps]
    with MetricWriter(run.id, engine=engine, flush_rows=5_000) as writer:
        for step, value in rows:
            writer.log(step, 0, {"loss": value})
    series = metric_series(run.id, "loss", max_points=300, engine=engine)
    reference = _reference_buckets(rows, 300, block_steps)
    assert len(series) <= 300
    assert series[0][0] == steps[0] and series[-1][0] == steps[-1]
    _assert_same_points(series, reference)


def test_blocks_stay_exact_through_replays_and_nan(engine):
    run = _new_run(engine)
    values = {step: float(step % 7) for step in range(BLOCK_STEPS * 600)}
    with MetricWriter(run.id, engine=engine, flush_rows=1000) as writer:
        for step, value in values.items():
            writer.log(step, 0, {"loss": value})
    # A resume replays the second half with new values and a diverged stretch of NaN.
    with MetricWriter(run.id, engine=engine, flush_rows=333) as writer:
        for step in range(BLOCK_STEPS * 300, BLOCK_STEPS * 600):
            values[step] = math.nan if step < BLOCK_STEPS * 320 else -float(step % 5)
            writer.log(step, 1, {"loss": values[step]})
    series = metric_series(run.id, "loss", max_points=200, engine=engine)
    assert any(math.isnan(v) for _, v in series)
    _assert_same_points(series, _reference_buckets(sorted(values.items()), 200, BLOCK_STEPS))


def test_short_series_comes_back_raw_and_many_runs_overlay(engine):
    first, second = _new_run(engine, "a"), _new_run(engine, "b")
    with MetricWriter(first.id, engine=engine) as writer:
        for step in range(0, 50, 5):
            writer.log(step, 0, {"mean_r1": step / 10})
    with MetricWriter(second.id, engine=engine) as writer:
        for step in range(2000):
            writer.log(step, 0, {"mean_r1": 1.0})
    assert metric_series(first.id, "mean_r1", engine=engine) == [(s, s / 10) for s in range(0, 50, 5)]
    many = metric_series_many([first.id, second.id], "mean_r1", max_points=100, engine=engine)
    assert many[first.id] == [(s, s / 10) for s in range(0, 50, 5)]
    assert len(many[second.id]) == 100 and all(v == 1.0 for _, v in many[second.id])
    assert many[second.id][0][0] == 0 and many[second.id][-1][0] == 1999
    assert metric_series(first.id, "never_logged", engine=engine) == []


def test_run_lifecycle_and_lookup(engine):
    name = unique_run_name("flickr8k", engine=engine)
    assert name.startswith("flickr8k-") and len(name.split("-")[-1]) == 4
    run = create_run(name, {"train": {"epochs": 3}}, "data/x", "cuda:0", 3, 300, parent="older",
                     log_path="/tmp/log.txt", engine=engine)
    with pytest.raises(NlmmError, match="already exists"):
        _new_run(engine, name)
    assert get_run(name, engine=engine).id == run.id == get_run(str(run.id), engine=engine).id
    assert json.loads(get_run(run.id, engine=engine).config) == {"train": {"epochs": 3}}
    with pytest.raises(NlmmError, match="no run named nope; list runs with `nlmm runs ls`"):
        get_run("nope", engine=engine)
    assert find_run("nope", engine=engine) is None and find_run(run.id, engine=engine).name == name
    set_status(run.id, "running", pid=os.getpid(), host="gpu-box", engine=engine)
    running = get_run(run.id, engine=engine)
    assert running.status == "running" and running.pid == os.getpid() and running.host == "gpu-box"
    set_status(run.id, "failed", error="Traceback: boom", engine=engine)
    failed = get_run(run.id, engine=engine)
    assert failed.status == "failed" and failed.error == "Traceback: boom" and failed.ended_at >= failed.started_at
    update_run(run.id, config=json.dumps({"train": {"epochs": 5}}), epochs_total=5, steps_total=500,
               error=None, engine=engine)
    time.sleep(0.01)
    set_status(run.id, "running", pid=os.getpid(), engine=engine)  # resumed by a new worker
    resumed = get_run(run.id, engine=engine)
    assert (json.loads(resumed.config), resumed.epochs_total, resumed.steps_total) == ({"train": {"epochs": 5}}, 5, 500)
    assert resumed.error is None and resumed.ended_at is None and resumed.started_at > failed.started_at
    with pytest.raises(NlmmError, match="cannot update run fields"):
        update_run(run.id, status="finished", engine=engine)
    with pytest.raises(NlmmError, match="no run with id 999"):
        update_run(999, device="cpu", engine=engine)
    set_status(run.id, "failed", engine=engine)
    with pytest.raises(NlmmError, match="unknown run status"):
        set_status(run.id, "exploded", engine=engine)
    other = _new_run(engine, "other")
    assert latest_run(engine=engine).id == other.id
    assert latest_run("failed", engine=engine).id == run.id
    assert [r.name for r in list_runs(name_like="flickr8k", engine=engine)] == [name]
    assert [r.name for r in list_runs(status="queued", engine=engine)] == ["other"]


def test_run_statuses_have_one_definition(engine, db_path):
    """Every status is either active or ended, the column holds the plain string a member
    equals, and the CLI and the dash style every status."""
    from nlmm.cli.reports import STATUS_STYLE

    assert set(ACTIVE_STATUSES) | set(ENDED_STATUSES) == set(RunStatus)
    assert not set(ACTIVE_STATUSES) & set(ENDED_STATUSES)
    assert set(STATUS_STYLE) == set(RunStatus)
    run = _new_run(engine)
    set_status(run.id, RunStatus.STOPPED, engine=engine)
    with sqlite3.connect(db_path) as conn:
        stored = conn.execute("SELECT status, typeof(status) FROM runs WHERE id = ?",
                              (run.id,)).fetchone()
    assert stored == ("stopped", "text")
    assert get_run(run.id, engine=engine).status == RunStatus.STOPPED
    assert [r.id for r in list_runs(status=RunStatus.STOPPED, engine=engine)] == [run.id]


def test_checkpoint_best_flag_moves_and_same_path_replaces(engine):
    run = _new_run(engine)
    record_checkpoint(run.id, 100, 0, "/ck/epoch0.pt", "epoch", {"mean_r1": 10.0}, True, 1000, engine=engine)
    record_checkpoint(run.id, 200, 1, "/ck/epoch1.pt", "epoch", {"mean_r1": 8.0}, False, 1000, engine=engine)
    record_checkpoint(run.id, 300, 2, "/ck/epoch2.pt", "epoch", {"mean_r1": 12.5}, True, 3_000_000_000, engine=engine)
    record_checkpoint(run.id, 300, 2, "/ck/last.pt", "last", {}, False, 10, engine=engine)
    record_checkpoint(run.id, 350, 2, "/ck/last.pt", "last", {}, False, 11, engine=engine)
    checkpoints = list_checkpoints(run.id, engine=engine)
    assert [(c.step, c.path, c.is_best) for c in checkpoints] == [
        (100, "/ck/epoch0.pt", False), (200, "/ck/epoch1.pt", False), (300, "/ck/epoch2.pt", True),
        (350, "/ck/last.pt", False)]
    best = best_checkpoint(run.id, engine=engine)
    assert best.path == "/ck/epoch2.pt" and best.metrics == {"mean_r1": 12.5} and best.bytes == 3_000_000_000
    assert last_checkpoint(run.id, engine=engine).path == "/ck/last.pt"
    assert get_run(run.id, engine=engine).best_metric == 12.5
    with pytest.raises(NlmmError, match="unknown checkpoint kind"):
        record_checkpoint(run.id, 1, 0, "/ck/x.pt", "weird", {}, False, 1, engine=engine)


def test_delete_run_removes_rows_of_every_table(engine, db_path):
    run, kept = _new_run(engine, "gone"), _new_run(engine, "kept")
    for target in (run, kept):
        with MetricWriter(target.id, engine=engine) as writer:
            writer.log(0, 0, {"loss": 1.0})
        record_checkpoint(target.id, 0, 0, f"/ck/{target.name}.pt", "last", {}, False, 1, engine=engine)
        add_system_samples([{"run_id": target.id, "cpu_percent": 5.0}], engine=engine)
    assert delete_run("gone", engine=engine).id == run.id
    for table in ("metrics", "checkpoints", "system_samples"):
        assert _raw(db_path, f"SELECT DISTINCT run_id FROM {table}") == [(kept.id,)]
    assert _raw(db_path, "SELECT name FROM runs") == [("kept",)]
    with pytest.raises(NlmmError, match="no run named gone"):
        delete_run("gone", engine=engine)


def test_system_samples_round_trip(engine):
    run = _new_run(engine)
    add_system_samples([
        {"run_id": run.id, "time": 10.0, "device_index": 0, "gpu_util": 93.0, "gpu_mem_used": 70 * 2**30,
         "gpu_mem_total": 80 * 2**30, "power_w": 612.5, "temperature_c": 71.0},
        {"run_id": run.id, "time": 10.0, "cpu_percent": 12.5, "ram_used": 2**33, "ram_total": 2**35},
        {"run_id": None, "time": 11.0, "cpu_percent": 3.0},
    ], engine=engine)
    samples = system_samples(run.id, engine=engine)
    assert [(s.device_index, s.gpu_mem_used, s.cpu_percent) for s in samples] == [
        (0, 70 * 2**30, None), (None, None, 12.5)]
    assert [s.time for s in system_samples(since=10.5, engine=engine)] == [11.0]
    assert len(system_samples(limit=2, engine=engine)) == 2
    with pytest.raises(NlmmError, match="unknown fields"):
        add_system_samples([{"gpu_utilisation": 1.0}], engine=engine)


_ALIVE_WORKER = """
import os, sys, time
from nlmm.store import create_run, get_engine, set_status
engine = get_engine(sys.argv[1])
run = create_run("victim", {}, "", "cpu", 1, 1, engine=engine)
set_status(run.id, "running", pid=os.getpid(), engine=engine)
print(run.id, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_killed_worker_shows_lost(engine, db_path, reap):
    url = f"sqlite:///{db_path}"
    worker = subprocess.Popen([sys.executable, "-c", _ALIVE_WORKER, url], stdout=subprocess.PIPE, text=True)
    try:
        run_id = int(worker.stdout.readline())
        time.sleep(0.6)
        # The heartbeat is stale but the process lives: it must stay running.
        assert mark_lost(0.5, engine=engine) == []
        assert [r.status for r in list_runs(engine=engine)] == ["running"]
        worker.send_signal(signal.SIGKILL)
        if reap:
            worker.wait(timeout=10)
        deadline = time.monotonic() + 5
        while get_run(run_id, engine=engine).status != "lost" and time.monotonic() < deadline:
            mark_lost(0.5, engine=engine)
            time.sleep(0.1)
        lost = get_run(run_id, engine=engine)
        assert lost.status == "lost" and lost.ended_at is not None and "disappeared" in lost.error
        # the run ended when it was last seen alive, not when the sweep noticed
        assert lost.ended_at == lost.heartbeat_at
    finally:
        worker.kill()
        worker.wait(timeout=10)
        worker.stdout.close()


def _writes(engine) -> list[str]:
    """Collects the write transactions (BEGIN IMMEDIATE) and UPDATEs that `engine` runs."""
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, stmt, *a: statements.append(stmt))
    return statements


def test_listing_runs_never_writes_and_the_sweep_is_explicit(engine):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    run = _new_run(engine, "dead")
    set_status(run.id, "running", pid=dead.pid, engine=engine)
    update_run(run.id, heartbeat_at=time.time() - 60, engine=engine)
    statements = _writes(engine)
    listed = list_runs(engine=engine)
    assert [r.status for r in listed] == ["running"]
    assert get_run(run.id, engine=engine).status == "running"
    assert not [s for s in statements if s.startswith(("BEGIN IMMEDIATE", "UPDATE"))]
    assert mark_lost(engine=engine) == [run.id]
    assert get_run(run.id, engine=engine).status == "lost"


def test_a_pid_reused_by_a_later_process_is_not_the_worker(engine):
    """The rule the launcher uses before it signals a worker: the registered pid must belong to
    a process that began no later than the worker was registered."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = _new_run(engine, "reused")
        set_status(run.id, "running", pid=other.pid, engine=engine)
        assert worker_alive(get_run(run.id, engine=engine))
        # registered long before the process now holding that pid began: a reused pid
        update_run(run.id, started_at=time.time() - 3600, engine=engine)
        assert not worker_alive(get_run(run.id, engine=engine))
        # another host's worker cannot be checked here: its heartbeat decides
        update_run(run.id, host="elsewhere", heartbeat_at=time.time(), engine=engine)
        assert worker_alive(get_run(run.id, engine=engine))
        update_run(run.id, heartbeat_at=time.time() - 60, engine=engine)
        assert not worker_alive(get_run(run.id, engine=engine))
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=10)


def test_unusable_store_locations_give_one_sentence_errors(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(NlmmError, match="cannot create the folder of the database"):
        get_engine(f"sqlite:///{tmp_path / 'a_file' / 'nlmm.db'}")
    with pytest.raises(NlmmError, match="cannot use the database URL nosuchdb://h/x"):
        get_engine("nosuchdb://h/x")


# ---- paths relative to the runs folder, and runs folders copied as a unit ----------------------

def test_run_files_are_stored_relative_to_the_runs_folder(engine, db_path, isolated_store, monkeypatch):
    folder = paths.run_dir("rel")
    run = _new_run(engine, "rel", log_path=str(folder / "train.log"))
    record_checkpoint(run.id, 3, 0, str(folder / "checkpoints" / "last.pt"), "last", {}, False, 1,
                      engine=engine)
    record_checkpoint(run.id, 3, 0, "/elsewhere/x.pt", "epoch", {}, False, 1, engine=engine)
    assert _raw(db_path, "SELECT log_path FROM runs") == [("rel/train.log",)]
    assert _raw(db_path, "SELECT path FROM checkpoints ORDER BY id") == [
        ("rel/checkpoints/last.pt",), ("/elsewhere/x.pt",)]
    # saved again at the same place: the row is replaced, the comparison sees through the type
    record_checkpoint(run.id, 6, 1, str(folder / "checkpoints" / "last.pt"), "last", {}, False, 2,
                      engine=engine)
    assert [c.step for c in list_checkpoints(run.id, engine=engine)] == [3, 6]
    # the same store read from another runs folder names that folder's files
    monkeypatch.setenv("NLMM_RUNS_DIR", str(isolated_store.parent / "moved"))
    moved = paths.runs_dir() / "rel"
    assert get_run("rel", engine=engine).log_path == str(moved / "train.log")
    assert last_checkpoint(run.id, engine=engine).path == str(moved / "checkpoints" / "last.pt")


def test_a_copied_store_of_older_nlmm_uses_the_copys_files(tmp_path, monkeypatch):
    """Version 1 stored absolute paths: a copy of its runs folder must not keep pointing at the
    original's files."""
    original, copy = tmp_path / "runs", tmp_path / "copy" / "runs"
    monkeypatch.setenv("NLMM_RUNS_DIR", str(original))
    db = original / "nlmm.db"
    engine = get_engine(f"sqlite:///{db}")
    run = _new_run(engine, "old")
    set_status(run.id, "finished", engine=engine)
    engine.dispose()
    conn = sqlite3.connect(db)
    # what nlmm wrote before paths were relative: absolute paths, schema version 1
    for column in ("elapsed_before", "phase", "processes"):  # added by migrations 3 and 4
        conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    conn.execute("UPDATE schema_version SET version = 1")
    conn.execute("UPDATE runs SET log_path = ?", (str(original / "old" / "train.log"),))
    for kind in ("best", "last"):
        conn.execute("INSERT INTO checkpoints (run_id, step, epoch, path, kind, metrics, is_best, "
                     "bytes, created_at) VALUES (?, 5, 1, ?, ?, '{}', ?, 1, 0)",
                     (run.id, str(original / "old" / "checkpoints" / f"{kind}.pt"), kind, kind == "best"))
    conn.execute("INSERT INTO checkpoints (run_id, step, epoch, path, kind, metrics, is_best, bytes, "
                 "created_at) VALUES (?, 1, 0, '/archive/other.pt', 'epoch', '{}', 0, 1, 0)", (run.id,))
    conn.commit()
    conn.close()
    shutil.copytree(original, copy)

    monkeypatch.setenv("NLMM_RUNS_DIR", str(copy))
    copied = get_engine(f"sqlite:///{copy / 'nlmm.db'}")
    assert _raw(copy / "nlmm.db", "SELECT version FROM schema_version") == [(LATEST_VERSION,)]
    migrated = get_run("old", engine=copied)
    assert migrated.log_path == str(copy / "old" / "train.log") and migrated.elapsed_before == 0
    assert best_checkpoint(run.id, engine=copied).path == str(copy / "old" / "checkpoints" / "best.pt")
    assert [c.path for c in list_checkpoints(run.id, engine=copied)] == [
        "/archive/other.pt", str(copy / "old" / "checkpoints" / "best.pt"),
        str(copy / "old" / "checkpoints" / "last.pt")]


# ---- elapsed time and ETA across resumes --------------------------------------------------------

def test_elapsed_and_eta_add_up_across_resumes(engine):
    run = _new_run(engine, "long")  # 100 steps planned
    set_status(run.id, "running", pid=os.getpid(), engine=engine)
    update_run(run.id, started_at=1000.0, step=40, engine=engine)
    set_status(run.id, "stopped", engine=engine)
    update_run(run.id, ended_at=1400.0, engine=engine)  # the first worker ran 400 s
    first = get_run(run.id, engine=engine)
    assert elapsed_seconds(first, now=5000.0) == 400.0 and eta_seconds(first, 5000.0) is None

    set_status(run.id, "queued", engine=engine)  # --resume, before its worker is started
    assert elapsed_seconds(get_run(run.id, engine=engine), now=5000.0) == 400.0
    set_status(run.id, "queued", pid=os.getpid(), engine=engine)  # its new worker registers
    set_status(run.id, "running", pid=os.getpid(), engine=engine)
    update_run(run.id, started_at=2000.0, step=50, engine=engine)
    resumed = get_run(run.id, engine=engine)
    assert resumed.elapsed_before == 400.0 and resumed.ended_at is None
    # 100 s into the second worker: 500 s for 50 steps, so 50 more steps take 500 s
    assert elapsed_seconds(resumed, now=2100.0) == 500.0
    assert eta_seconds(resumed, now=2100.0) == 500.0
    set_status(run.id, "finished", engine=engine)
    update_run(run.id, ended_at=2600.0, engine=engine)
    assert elapsed_seconds(get_run(run.id, engine=engine), now=9999.0) == 1000.0
