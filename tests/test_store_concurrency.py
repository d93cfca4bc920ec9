"""Several real processes on one SQLite file: writers, a polling reader, simultaneous creation."""

import multiprocessing as mp
import os
import sqlite3
import time
import traceback
from pathlib import Path

from nlmm.store import (
    LATEST_VERSION,
    MetricWriter,
    create_run,
    get_engine,
    list_runs,
    mark_lost,
    metric_series,
)

WRITERS = 4
ROWS_PER_WRITER = 5000
FLUSH_ROWS = 200


def _value(run_index: int, step: int) -> float:
    return run_index * 1_000_000 + step / 7


def _write_run(url: str, run_id: int, run_index: int, start: "mp.synchronize.Event", errors: "mp.Queue") -> None:
    try:
        engine = get_engine(url)
        start.wait(30)
        with MetricWriter(run_id, engine=engine, flush_rows=FLUSH_ROWS, flush_seconds=60) as writer:
            for step in range(ROWS_PER_WRITER):
                writer.log(step, 0, {"loss": _value(run_index, step)})
                if step % FLUSH_ROWS == FLUSH_ROWS - 1:
                    time.sleep(0.002)
    except Exception:  # noqa: BLE001 - reported to the test through the queue
        errors.put(traceback.format_exc())


def _poll(url: str, run_ids: list[int], start: "mp.synchronize.Event", stop: "mp.synchronize.Event",
          errors: "mp.Queue", polls: "mp.Value") -> None:
    try:
        engine = get_engine(url)
        start.wait(30)
        while not stop.is_set():
            mark_lost(engine=engine)  # what the dash does before it lists runs
            list_runs(engine=engine)
            for run_id in run_ids:
                metric_series(run_id, "loss", max_points=100, engine=engine)
            with polls.get_lock():
                polls.value += 1
    except Exception:  # noqa: BLE001 - reported to the test through the queue
        errors.put(traceback.format_exc())


def _drain(queue: "mp.Queue") -> list[str]:
    found = []
    while not queue.empty():
        found.append(queue.get())
    return found


def test_four_writers_and_a_reader_lose_nothing(tmp_path: Path):
    db = tmp_path / "nlmm.db"
    url = f"sqlite:///{db}"
    engine = get_engine(url)
    run_ids = [create_run(f"w{i}", {}, "", "cpu", 1, ROWS_PER_WRITER, engine=engine).id for i in range(WRITERS)]
    ctx = mp.get_context("spawn")
    start, stop, errors, polls = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
    writers = [ctx.Process(target=_write_run, args=(url, run_id, i, start, errors))
               for i, run_id in enumerate(run_ids)]
    reader = ctx.Process(target=_poll, args=(url, run_ids, start, stop, errors, polls))
    for process in (*writers, reader):
        process.start()
    start.set()
    for process in writers:
        process.join(60)
    stop.set()
    reader.join(30)
    assert _drain(errors) == []
    assert [p.exitcode for p in (*writers, reader)] == [0] * (WRITERS + 1)
    assert polls.value > 0
    conn = sqlite3.connect(db)
    try:
        for i, run_id in enumerate(run_ids):
            rows = conn.execute("SELECT step, value FROM metrics WHERE run_id = ? ORDER BY step", (run_id,)).fetchall()
            assert rows == [(step, _value(i, step)) for step in range(ROWS_PER_WRITER)]
    finally:
        conn.close()


def _open_store(url: str, barrier: "mp.synchronize.Barrier", errors: "mp.Queue") -> None:
    try:
        barrier.wait(30)
        engine = get_engine(url)
        create_run(f"p{os.getpid()}", {}, "", "cpu", 1, 1, engine=engine)
    except Exception:  # noqa: BLE001 - reported to the test through the queue
        errors.put(traceback.format_exc())


def test_simultaneous_schema_creation_on_a_new_file(tmp_path: Path):
    db = tmp_path / "fresh" / "nlmm.db"
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    processes = [ctx.Process(target=_open_store, args=(f"sqlite:///{db}", barrier, errors)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert _drain(errors) == []
    assert [p.exitcode for p in processes] == [0] * 4
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT id, version FROM schema_version").fetchall() == [(1, LATEST_VERSION)]
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (4,)
    finally:
        conn.close()


def _use_inherited_store(url: str, errors: "mp.Queue") -> None:
    try:
        engine = get_engine(url)
        create_run(f"child{os.getpid()}", {}, "", "cpu", 1, 1, engine=engine)
        errors.put(None if engine is not _parent_engine else "the child reused the parent's engine")
    except Exception:  # noqa: BLE001 - reported to the test through the queue
        errors.put(traceback.format_exc())


_parent_engine = None


def test_forked_child_gets_its_own_engine(tmp_path: Path):
    global _parent_engine
    url = f"sqlite:///{tmp_path / 'nlmm.db'}"
    _parent_engine = get_engine(url)
    create_run("parent-before", {}, "", "cpu", 1, 1, engine=_parent_engine)
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    child = ctx.Process(target=_use_inherited_store, args=(url, errors))
    child.start()
    child.join(30)
    assert errors.get(timeout=5) is None and child.exitcode == 0
    create_run("parent-after", {}, "", "cpu", 1, 1, engine=_parent_engine)
    assert sorted(r.name for r in list_runs(engine=_parent_engine)) == sorted(
        ["parent-before", "parent-after", f"child{child.pid}"])
