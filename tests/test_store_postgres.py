"""The store on a real PostgreSQL server: the same answers as on SQLite, several processes at once,
and a training run logging to it through `NLMM_DB_URL=postgresql://...`.

Every test gets a new database on the server that NLMM_TEST_PG_URL names (`.ci/run` starts one);
without a reachable server they are skipped and the skip says why.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from sqlalchemy import text
from test_faults import SMALL, TINY_DATA, run_soak

from nlmm import store
from nlmm.errors import NlmmError


def plain_series(values: dict[int, float | None], max_points: int) -> list[tuple[int, float]]:
    """metric_series' documented downsampling, computed in Python from the logged values."""
    steps = sorted(values)
    if len(steps) <= max_points:
        return [(s, math.nan if values[s] is None else values[s]) for s in steps]
    lo, hi = steps[0], steps[-1]
    buckets: dict[int, list[int]] = {}
    if hi - lo + 1 <= store.BLOCK_STEPS * max_points:
        for s in steps:
            buckets.setdefault((s - lo) * max_points // (hi - lo + 1), []).append(s)
    else:
        low_block, blocks = lo // store.BLOCK_STEPS, hi // store.BLOCK_STEPS - lo // store.BLOCK_STEPS + 1
        for s in steps:
            buckets.setdefault((s // store.BLOCK_STEPS - low_block) * max_points // blocks, []).append(s)
    points = []
    for _, members in sorted(buckets.items()):
        finite = [values[s] for s in members if values[s] is not None]
        points.append((members[0], sum(finite) / len(finite) if finite else math.nan))
    points[-1] = (hi, points[-1][1])
    return points


def same_points(got, want) -> bool:
    return len(got) == len(want) and all(
        gs == ws and (math.isnan(gv) and math.isnan(wv) or gv == pytest.approx(wv, rel=1e-9))
        for (gs, gv), (ws, wv) in zip(got, want))


def test_url_without_driver_opens_with_psycopg_and_runs_have_their_lifecycle(pg_url):
    engine = store.get_engine(pg_url)
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id, version FROM schema_version")).all() == \
            [(1, store.LATEST_VERSION)]
    run = store.create_run("pg-run", {"train": {"lr": 1e-3}}, "data/x", "cpu", 2, 10,
                           engine=engine)
    with pytest.raises(NlmmError, match="already exists"):
        store.create_run("pg-run", {}, "", "cpu", 1, 1, engine=engine)
    store.set_status(run.id, "running", pid=os.getpid(), engine=engine)
    store.heartbeat(run.id, step=7, epoch=1, engine=engine)
    store.update_run(run.id, steps_total=20, engine=engine)
    got = store.get_run("pg-run", engine=engine)
    assert (got.status, got.step, got.epoch, got.steps_total, got.pid) == \
        ("running", 7, 1, 20, os.getpid())
    assert store.mark_lost(engine=engine) == []  # alive: not lost
    assert [r.name for r in store.list_runs(engine=engine)] == ["pg-run"]
    store.set_status(run.id, "finished", engine=engine)
    assert store.latest_run("finished", engine=engine).id == run.id
    assert store.unique_run_name("pg", engine=engine).startswith("pg-")
    store.delete_run(run.id, engine=engine)
    assert store.find_run("pg-run", engine=engine) is None


def test_metrics_and_checkpoints_answer_as_on_sqlite(pg_url, tmp_path):
    engines = {"postgresql": store.get_engine(pg_url),
               "sqlite": store.get_engine(f"sqlite:///{tmp_path / 'same.db'}")}
    n = store.BLOCK_STEPS * 60 + 17
    values = {s: (None if s % 97 == 0 else math.sin(s / 50) + s / n) for s in range(1, n + 1)}
    replay = {s: -float(s) for s in range(300, 420)}  # a resumed worker logging steps again
    answers = {}
    for name, engine in engines.items():
        run = store.create_run("m", {}, "", "cpu", 1, n, engine=engine)
        with store.MetricWriter(run.id, engine=engine, flush_rows=1000) as writer:
            for s, v in values.items():
                writer.log(s, s // 100, {"loss": math.nan if v is None else v, "lr/fast": 0.5})
            for s, v in replay.items():
                writer.log(s, 3, {"loss": v})
        store.record_checkpoint(run.id, 100, 1, "/c/best.pt", "best", {"mean_r1": 10.0}, True, 5,
                                engine=engine)
        store.record_checkpoint(run.id, 200, 2, "/c/best.pt", "best", {"mean_r1": 20.0}, True, 6,
                                engine=engine)
        store.record_checkpoint(run.id, 250, 2, "/c/last.pt", "last", {}, False, 7, engine=engine)
        store.add_system_samples([{"run_id": run.id, "time": 1.0 + i, "cpu_percent": 10.0 * i}
                                  for i in range(3)], engine=engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM metrics WHERE run_id = :r"),
                                {"r": run.id}).scalar_one()
        answers[name] = {
            "rows": rows,
            "short": store.metric_series(run.id, "loss", max_points=n + 1, engine=engine),
            "buckets": store.metric_series(run.id, "loss", max_points=200, engine=engine),
            "blocks": store.metric_series(run.id, "loss", max_points=20, engine=engine),
            "keys": store.metric_keys(run.id, engine=engine),
            "latest": store.latest_metrics(run.id, engine=engine),
            "best_metric": store.best_metric(run.id, "loss", engine=engine),
            "checkpoints": [(c.step, c.kind, c.is_best, c.bytes, c.metrics)
                            for c in store.list_checkpoints(run.id, engine=engine)],
            "best": store.best_checkpoint(run.id, engine=engine).step,
            "last": store.last_checkpoint(run.id, engine=engine).step,
            "run_best": store.get_run(run.id, engine=engine).best_metric,
            "samples": [(s.time, s.cpu_percent) for s in store.system_samples(run.id, engine=engine)],
        }
    pg, lite = answers["postgresql"], answers["sqlite"]
    logged = {**values, **replay}
    assert pg["rows"] == 2 * n
    assert same_points(pg["short"], plain_series(logged, n + 1))
    assert same_points(pg["buckets"], plain_series(logged, 200))
    assert same_points(pg["blocks"], plain_series(logged, 20))
    assert pg["keys"] == ["loss", "lr/fast"]
    assert pg["latest"] == {"loss": values[n], "lr/fast": 0.5}
    assert pg["best_metric"] == max(v for v in logged.values() if v is not None)
    assert pg["checkpoints"] == [(200, "best", True, 6, {"mean_r1": 20.0}), (250, "last", False, 7, {})]
    assert (pg["best"], pg["last"], pg["run_best"]) == (200, 250, 20.0)
    assert pg["samples"] == [(1.0, 0.0), (2.0, 10.0), (3.0, 20.0)]
    for key in pg:
        if key in ("short", "buckets", "blocks"):
            assert same_points(pg[key], lite[key]), key
        else:
            assert pg[key] == lite[key], key


def _open_and_register(url: str, barrier, errors) -> None:
    try:
        barrier.wait(30)
        store.create_run(f"p{os.getpid()}", {}, "", "cpu", 1, 1, engine=store.get_engine(url))
    except Exception:  # noqa: BLE001 - reported to the test through the queue
        errors.put(traceback.format_exc())


def test_four_processes_creating_the_schema_at_once(pg_url):
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_and_register, args=(pg_url, barrier, errors)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert errors.empty() and [p.exitcode for p in procs] == [0] * 4
    with store.get_engine(pg_url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM schema_version")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM runs")).scalar_one() == 4


def test_four_writers_and_a_reader_on_postgres(pg_url):
    run_soak(pg_url, seconds=3)


def test_a_training_run_logs_to_postgres(pg_url, tiny_corpus, tmp_path, isolated_store):
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.root, root)
    env = dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), NLMM_DB_URL=pg_url, COLUMNS="200",
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "nlmm.cli", "train", "flickr8k", "--data", str(root),
                          "--name", "on-pg", "--steps", "2", *TINY_DATA, *SMALL],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    engine = store.get_engine(pg_url)
    run = store.get_run("on-pg", engine=engine)
    assert (run.status, run.step) == ("finished", 2)
    assert [s for s, _ in store.metric_series(run.id, "loss", engine=engine)] == [1, 2]
    assert "test/mean_r1" in store.metric_keys(run.id, engine=engine)
    assert Path(store.last_checkpoint(run.id, engine=engine).path).is_file()
    assert not (isolated_store / "nlmm.db").exists(), "nothing may go to the SQLite default"
    listing = subprocess.run([sys.executable, "-m", "nlmm.cli", "runs", "ls"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert "on-pg" in listing.stdout and "finished" in listing.stdout


def test_an_unreachable_server_is_one_clear_error():
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: install psycopg")
    with pytest.raises(NlmmError, match=r"cannot open the store postgresql\+psycopg://nobody@"
                                        r"127\.0\.0\.1:1/nlmm .*check that the server is running"):
        store.get_engine("postgresql://nobody@127.0.0.1:1/nlmm")
