"""How a run's progress reads in the dash, `runs show` and the follower's bar: an ETA that
evaluations do not throw off, epochs counted from 1, the first start beside the latest resume,
checkpoint sizes from the files as they are now, and decimal units everywhere."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import update
from test_dash import T0, add_run, dash_store, make_app, plain, settle, table_rows  # noqa: F401

from console.checkpoints.screen import CheckpointsScreen
from console.run.screen import RunScreen
from nlmm import store
from nlmm.cli.follow import progress_info
from nlmm.config import Config
from nlmm.cli.reports import epoch_text, run_details
from nlmm.units import file_size

BATCH = Config().train.batch_size


def running_run(step: int, steps_total: int = 60, started: float = 1000.0, **fields) -> store.Run:
    """A run row as the store hands it out, not stored: the ETA functions only read it."""
    values = dict(name="r", status="running", created_at=started, started_at=started,
                  steps_total=steps_total, epochs_total=3, step=step, epoch=1,
                  config=json.dumps({"train": {"batch_size": BATCH, "accumulate": 1}}))
    return store.Run(**(values | fields))


def test_an_evaluation_does_not_make_the_eta_jump():
    # 1 s per step (32 triples/s), a 60 s evaluation after step 20
    before = running_run(step=20)
    assert store.eta_seconds(before, now=1020.0, triples_per_s=32.0) == 40.0
    after = running_run(step=21)
    # the run's average rate would say 39 × 81 s / 21 ≈ 150 s left: the jump the issue saw
    assert store.eta_seconds(after, now=1081.0) == pytest.approx(39 * 81 / 21)
    assert store.eta_seconds(after, now=1081.0, triples_per_s=32.0) == 39.0
    # accumulation: an optimizer step is batch × accumulate triples
    accumulated = running_run(step=21, config=json.dumps(
        {"train": {"batch_size": BATCH, "accumulate": 4}}))
    assert store.eta_seconds(accumulated, now=1081.0, triples_per_s=32.0) == 39 * 4


def test_epochs_count_from_one_before_the_first_step():
    assert epoch_text(running_run(step=0, epoch=0, epochs_total=30)) == "1/30"
    assert epoch_text(running_run(step=5, epoch=2, epochs_total=30)) == "2/30"


def test_sizes_are_decimal_everywhere():
    assert [file_size(n) for n in (None, 512, 12_345, 48 * 2**20, 721_400_000, 10_723_000_000)] \
        == ["-", "512 B", "12 kB", "50 MB", "721 MB", "10.72 GB"]


def test_the_bar_says_which_step_a_lagging_loss_is_from():
    run = running_run(step=40, epoch=0, epochs_total=30)
    lagging = progress_info(run, {"loss": (30, 2.5), "triples_per_s": (30, 64.0)})
    assert lagging == "epoch 1/30  loss 2.500 (step 30)  64 triples/s"
    assert progress_info(run, {"loss": (40, 2.4)}) == "epoch 1/30  loss 2.400"


def _resumed_with_a_truncated_best(runs: Path) -> store.Run:
    """A run stopped once and resumed, whose best.pt lost half its bytes after it was saved."""
    run = add_run("resumed", "running", steps=200, steps_total=400, started=T0 + 7200)
    with store.write_session() as session:
        session.exec(update(store.Run).where(store.Run.id == run.id).values(
            created_at=T0, elapsed_before=600.0, config=json.dumps(Config().to_dict())))
    best = runs / "resumed" / "checkpoints" / "best.pt"
    with best.open("r+b") as fh:
        fh.truncate(24_000_000)
    with store.MetricWriter(run.id) as writer:  # 2 steps/s over the latest log window
        writer.log(200, 2, {"triples_per_s": 64.0})
    return store.get_run(run.id)


async def test_the_dash_shows_first_start_eta_and_the_size_of_the_file_now(dash_store):
    run = _resumed_with_a_truncated_best(dash_store)
    fresh = add_run("fresh", "running", steps=0, steps_total=400, epochs_total=30)
    with store.write_session() as session:  # the worker registered, before its first step
        session.exec(update(store.Run).where(store.Run.id == fresh.id).values(step=0, epoch=0))
    app = make_app(now=T0 + 7200 + 100)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        rows = {row[1]: row for row in table_rows(app, "#runs-table")}
        assert rows["resumed"][-1] == "11-14 22:13"  # first start, not the resume at 00:13
        assert rows["fresh"][4].startswith("1/30 ")

        app.push_screen(RunScreen(run.id))
        await settle(pilot)
        timing = plain(app.screen.query_one("#run-timing"))
        # 200 steps left at 2 steps/s; elapsed is both workers' 600 s + 100 s
        assert "elapsed 0:11:40  ETA 0:01:40" in timing
        assert "started 11-14 22:13, resumed 11-15 00:13" in timing

        app.push_screen(CheckpointsScreen(run.id))
        await settle(pilot)
        [row] = table_rows(app, "#ckpt-table")
        assert row[7] == "24 MB"  # recorded as 48 MiB when saved

        (dash_store / "resumed" / "checkpoints" / "best.pt").unlink()
        app.screen.refetch()
        await settle(pilot)
        assert table_rows(app, "#ckpt-table")[0][7] == "missing"

        app.pop_screen()
        app.push_screen(RunScreen(fresh.id))
        await settle(pilot)
        assert "epoch 1/30  step 0/400" in plain(app.screen.query_one("#run-summary"))


def test_runs_show_reads_the_same(dash_store):
    _resumed_with_a_truncated_best(dash_store)
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(run_details("resumed"))
    text = console.export_text()
    assert "started   2023-11-14 22:13, resumed 2023-11-15 00:13" in text
    # the ETA at the latest training rate does not depend on the wall clock
    assert "epoch 2/4" in text and "ETA 0:01:40" in text
    [row] = [line for line in text.splitlines() if "best.pt" in line]
    assert " 24 MB " in row
