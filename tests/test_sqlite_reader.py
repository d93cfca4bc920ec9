"""`nlmm runs ls`'s quick read of a SQLite store: the same runs as the store gives, or no answer."""

import sqlite3
import subprocess
import sys

import pytest

from nlmm import store
from nlmm.store.migrations import LATEST_VERSION
from nlmm.store.sqlite_reader import SCHEMA_VERSION, read_runs, store_file


def as_store_sees(status=None) -> list[dict]:
    store.mark_lost()
    return [run.model_dump() for run in store.list_runs(status=status)]


def make_runs() -> dict[str, int]:
    ids = {}
    for name in ("alpha", "beta", "gamma", "delta"):
        ids[name] = store.create_run(name, {"model": {"d_model": 32}}, data="/data/x", device="cpu",
                                     epochs_total=3, steps_total=30,
                                     log_path=str(store.run_dir(name) / "train.log")).id
    store.set_status(ids["beta"], "running", pid=None)
    store.heartbeat(ids["beta"], step=7, epoch=1, phase="training")
    store.set_status(ids["gamma"], "finished")
    store.update_run(ids["gamma"], best_metric=42.5, step=30, epoch=3)
    store.set_status(ids["delta"], "failed", error="out of memory")
    return ids


def test_reads_what_the_store_reads(isolated_store):
    make_runs()
    quick = read_runs()
    assert quick is not None
    assert [vars(row) for row in quick] == as_store_sees()  # every column, converted, in order
    assert [row.name for row in quick] == ["delta", "gamma", "beta", "alpha"]
    assert quick[0].log_path == str(isolated_store / "delta" / "train.log")  # absolute again
    for status in ("running", "finished", "queued", "lost"):
        assert [vars(row) for row in read_runs(status)] == as_store_sees(status)


def test_knows_the_latest_schema_version():
    assert SCHEMA_VERSION == LATEST_VERSION


def test_leaves_the_sweep_to_the_store(isolated_store):
    ids = make_runs()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.set_status(ids["alpha"], "running", pid=dead.pid)
    with sqlite3.connect(store_file()) as db:  # silent for a minute
        db.execute("UPDATE runs SET heartbeat_at = heartbeat_at - 60, started_at = started_at - 60 "
                   "WHERE id = ?", (ids["alpha"],))
    assert read_runs() is None
    assert read_runs("finished") is None  # the sweep covers every run, whatever is listed
    assert store.mark_lost() == [ids["alpha"]]
    assert [row.name for row in read_runs("lost")] == ["alpha"]


@pytest.mark.parametrize("case", ["no store yet", "older schema", "not a database",
                                  "another database", "unknown status"])
def test_no_answer_where_only_the_store_can_answer(isolated_store, monkeypatch, case):
    status = None
    if case not in ("no store yet", "not a database"):
        make_runs()
    if case == "older schema":
        with sqlite3.connect(store_file()) as db:
            db.execute("UPDATE schema_version SET version = 3")
    elif case == "not a database":
        store_file().parent.mkdir(parents=True)
        store_file().write_bytes(b"not a database at all" * 100)
    elif case == "another database":
        monkeypatch.setenv("NLMM_DB_URL", "postgresql://user@localhost/nlmm")
    elif case == "unknown status":
        status = "sleeping"
    assert read_runs(status) is None
    if case == "no store yet":
        assert not store_file().exists()  # reading never creates a store
