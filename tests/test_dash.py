"""`nlmm dash` driven by Textual's Pilot against a real SQLite store filled by the real writers.

Runs are written with `store.create_run`, `store.MetricWriter` and `store.record_checkpoint`;
the live-update test writes from a separate process while the app polls; the worker test starts
a real training subprocess through the launcher, stops it from the dash, and searches with the
checkpoint it saved.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import multiprocessing
import multiprocessing.synchronize
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from rich.console import Console
from sqlalchemy import update
from textual.pilot import Pilot
from textual.widgets import Input, Select, SelectionList

from console.app import NlmmDash, run_dashboard
from console.checkpoints.more_epochs import MoreEpochsScreen
from console.checkpoints.screen import CheckpointsScreen
from console.compare.screen import CompareScreen
from console.dialogs.confirm import ConfirmScreen
from console.dialogs.help import HelpScreen
from console.dialogs.new_run import NewRunScreen
from console.polling import PollingScreen
from console.run.screen import RunScreen
from console.runs.screen import RunsScreen
from console.search.screen import SearchScreen
from console.widgets.chart import MetricChart
from console.widgets.keyed_table import KeyedTable
from nlmm import store
from nlmm.errors import NlmmError
from nlmm.metric_names import DIRECTIONS, KS
from nlmm.search.engine import SearchHit

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC: every stored time is fixed relative to it
OTHER_HOST = "gpu-node-7"  # runs "running" elsewhere are never marked lost by this host
CONFIG = {"cms_levels": [{"name": "fast"}, {"name": "mid"}, {"name": "slow"}]}


def step_values(step: int) -> dict[str, float]:
    """The scalars a worker logs at `step`: losses, lr per level, throughput."""
    return {"loss": 3.0 * math.exp(-step / 150) + 0.2, "loss_i2t": math.exp(-step / 120),
            "loss_i2a": 1.2 * math.exp(-step / 200), "loss_t2a": 0.9 * math.exp(-step / 250),
            "lr/fast": 1e-3, "lr/mid": 5e-4, "lr/slow": 2.5e-4,
            "triples_per_s": 120.0 + (step % 7)}


def eval_values(step: int) -> dict[str, float]:
    """Recall@K of an evaluation at `step`, K = 1, 5, 10 in six directions, plus mean R@1."""
    values = {f"{d}_r{k}": min(100.0, (i + 1) * k + step / 20)
              for i, d in enumerate(DIRECTIONS) for k in KS}
    values["mean_r1"] = sum(values[f"{d}_r1"] for d in DIRECTIONS) / 6
    return values


def add_run(name: str, status: str, *, steps: int = 200, steps_total: int = 400,
            epochs_total: int = 4, started: float = T0, seconds: float = 3725.0,
            error: str | None = None, device: str = "cpu", log_every: int = 10,
            eval_every: int = 100, checkpoint: bool = True, gpu: bool = True) -> store.Run:
    """A run as a worker leaves it: metrics every `log_every` steps, an evaluation (and a best
    checkpoint) every `eval_every` steps, a log file, system samples (host only without `gpu`,
    as a worker on a machine without one records), then fixed times."""
    folder = Path(os.environ["NLMM_RUNS_DIR"]) / name
    folder.mkdir(parents=True, exist_ok=True)
    run = store.create_run(name, CONFIG, data="data/synth", device=device,
                           epochs_total=epochs_total, steps_total=steps_total,
                           log_path=str(folder / "train.log"))
    store.set_status(run.id, "running", pid=os.getpid())
    per_epoch = steps_total // epochs_total
    with store.MetricWriter(run.id) as writer:
        for step in range(0, steps + 1, log_every):
            values = step_values(step)
            if step and step % eval_every == 0:
                values |= eval_values(step)
            writer.log(step, step // per_epoch, values)
    if checkpoint and steps >= eval_every:
        best_step = steps - steps % eval_every
        path = folder / "checkpoints" / "best.pt"
        path.parent.mkdir(exist_ok=True)
        with path.open("wb") as fh:
            fh.truncate(48 * 2**20)  # a sparse file: its size without writing 48 MiB
        store.record_checkpoint(run.id, best_step, best_step // per_epoch, str(path), "best",
                                eval_values(best_step), True, 48 * 2**20)
    store.add_system_samples(
        [{"run_id": run.id, "time": started + t, "device_index": 0, "gpu_util": 40.0 + t % 50,
          "gpu_mem_used": 6 * 2**30, "gpu_mem_total": 24 * 2**30, "power_w": 210.0,
          "temperature_c": 64.0} for t in range(0, 60, 2) if gpu]
        + [{"run_id": run.id, "time": started + t, "cpu_percent": 20.0 + t % 30,
            "ram_used": 12 * 2**30, "ram_total": 64 * 2**30} for t in range(0, 60, 2)])
    (folder / "train.log").write_text("".join(f"epoch {e} step {e * per_epoch} loss "
                                              f"{step_values(e * per_epoch)['loss']:.3f}\n"
                                              for e in range(epochs_total)))
    if status != "running":
        store.set_status(run.id, status, error=error)
    ended = None if status in ("running", "queued") else started + seconds
    with store.write_session() as session:
        session.exec(update(store.Run).where(store.Run.id == run.id).values(
            created_at=started - 30, started_at=started, ended_at=ended, heartbeat_at=ended or started,
            host=OTHER_HOST))
    return store.get_run(run.id)


def fill_demo_store() -> list[store.Run]:
    """Four runs in four states, the newest first in the runs table."""
    return [
        add_run("flickr8k-baseline", "finished", steps=400, seconds=7384.0),
        add_run("flickr8k-muon", "running", steps=250, started=T0 + 600),
        add_run("flickr8k-lr-high", "failed", steps=120, started=T0 + 1200, seconds=61.0,
                error="Traceback (most recent call last):\n  ...\n"
                      "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        add_run("synth-smoke", "stopped", steps=60, started=T0 + 1800, seconds=95.0, device="cuda",
                eval_every=30),
    ]


@pytest.fixture
def dash_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SQLite store in tmp_path; set before any engine is made for it."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("NLMM_RUNS_DIR", str(runs))
    monkeypatch.setenv("NLMM_DB_URL", f"sqlite:///{runs / 'nlmm.db'}")
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield runs
    monkeypatch.undo()
    time.tzset()


def make_app(poll_s: float = 0.2, now: float = T0 + 4000) -> NlmmDash:
    return NlmmDash(poll_s=poll_s, clock=lambda: now)


async def settle(pilot: Pilot) -> None:
    """Let the current screen's fetch (and any fetch it queued) finish and be applied."""
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def until(pilot: Pilot, condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.1)


def plain(widget: object) -> str:
    """What a Static or Label shows, as plain text (rich tables included)."""
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def table_rows(app: NlmmDash, selector: str) -> list[list[str]]:
    table = app.screen.query_one(selector, KeyedTable)
    return [[str(cell) for cell in table.get_row(key)] for key in table.keys]


def screen_lines(app: NlmmDash) -> list[str]:
    """The terminal as the user sees it, one string per row (dialogs over their screen),
    rendered as App.export_screenshot renders it."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True)
    console.print(app.screen._compositor.render_update(full=True,
                                                       screen_stack=app._background_screens))
    return console.export_text().splitlines()


def footer_keys_missing(app: NlmmDash) -> list[str]:
    """The keys the current screen shows in its footer (`key Description`) not on its last row."""
    footer = screen_lines(app)[-1]
    shown = [f"{app.get_key_display(active.binding)} {active.binding.description}"
             for active in app.screen.active_bindings.values() if active.binding.show]
    assert shown
    return [key for key in shown if key not in footer]


def fits_its_width(table: KeyedTable) -> bool:
    """No column is cut by the table's edge: nothing to scroll to sideways."""
    return table.virtual_size.width <= table.scrollable_content_region.width


# ---- runs screen


async def test_empty_store_tells_how_to_start_a_run(dash_store):
    async with make_app().run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, RunsScreen)
        empty = screen.query_one("#runs-empty")
        assert empty.display and not screen.query_one("#runs-table").display
        text = plain(empty)
        assert "nlmm train flickr8k" in text and "--synthetic" in text


async def test_runs_table_shows_each_run_and_filters_by_status_and_name(dash_store):
    fill_demo_store()
    async with make_app(now=T0 + 600 + 3725).run_test(size=(120, 30)) as pilot:
        await settle(pilot)
        rows = {row[1]: row for row in table_rows(pilot.app, "#runs-table")}
        assert list(rows) == ["synth-smoke", "flickr8k-lr-high", "flickr8k-muon",
                              "flickr8k-baseline"]  # newest first
        # name, status, progress, epoch · step, best R@1, elapsed, device, started (UTC): the
        # run's first start (its row is made 30 s before its worker starts)
        assert rows["flickr8k-muon"][1:] == ["flickr8k-muon", "running", "62%", "2/4 · 250",
                                             f"{eval_values(200)['mean_r1']:.1f}", "1:02:05",
                                             "cpu", "11-14 22:22"]
        assert rows["flickr8k-baseline"][2:8] == ["finished", "100%", "4/4 · 400",
                                                  f"{eval_values(400)['mean_r1']:.1f}",
                                                  "2:03:04", "cpu"]
        assert rows["flickr8k-lr-high"][6] == "0:01:01"

        await pilot.press("f")  # status filter: running
        await settle(pilot)
        assert [r[1] for r in table_rows(pilot.app, "#runs-table")] == ["flickr8k-muon"]
        for _ in range(5):  # running → queued → finished → stopped → failed → lost
            await pilot.press("f")
        await pilot.press("f")  # → all
        await settle(pilot)
        assert len(table_rows(pilot.app, "#runs-table")) == 4

        await pilot.press("slash", *"flickr8k-l")
        await settle(pilot)
        assert [r[1] for r in table_rows(pilot.app, "#runs-table")] == ["flickr8k-lr-high"]
        await pilot.press(*"zz")
        await settle(pilot)
        assert table_rows(pilot.app, "#runs-table") == []
        assert "no runs match" in plain(pilot.app.screen.query_one("#runs-count"))
        assert not pilot.app.screen.query_one("#runs-empty").display


def test_run_dashboard_rejects_an_unknown_run_before_opening(dash_store):
    add_run("only-run", "finished", steps=20)
    with pytest.raises(NlmmError, match="no run named nope"):
        run_dashboard(run="nope")


# ---- navigation


async def test_navigation_between_every_screen(dash_store):
    runs = fill_demo_store()
    by_name = {run.name: run for run in runs}
    async with make_app().run_test(size=(80, 24)) as pilot:
        app = pilot.app
        await settle(pilot)
        await pilot.press("down", "down")  # third row: flickr8k-muon
        await pilot.press("enter")
        await settle(pilot)
        run_screen = app.screen
        assert isinstance(run_screen, RunScreen)
        assert run_screen.run_id == by_name["flickr8k-muon"].id
        assert "flickr8k-muon" in plain(run_screen.query_one("#run-summary"))

        await pilot.press("2")
        await settle(pilot)
        recall = run_screen.query_one("#chart-recall", MetricChart)
        assert set(recall.series) == {*DIRECTIONS, "mean"}
        await pilot.press("k")
        await settle(pilot)
        assert recall.chart_title.startswith("Recall@5")
        assert recall.series["i2t"] == [(100, eval_values(100)["i2t_r5"]),
                                        (200, eval_values(200)["i2t_r5"])]
        assert "mean" not in recall.series  # mean R@1 belongs to K = 1 only

        await pilot.press("p")
        await settle(pilot)
        assert isinstance(app.screen, CheckpointsScreen)
        rows = table_rows(app, "#ckpt-table")
        assert rows == [["★", "best", "200", "2", f"{eval_values(200)['mean_r1']:.1f}",
                         f"{eval_values(200)['i2t_r1']:.1f}", f"{eval_values(200)['t2i_r1']:.1f}",
                         "50 MB", "best.pt"]]

        await pilot.press("escape", "escape")
        await settle(pilot)
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("space", "up", "space", "c")  # mark muon and lr-high, compare
        await settle(pilot)
        compare = app.screen
        assert isinstance(compare, CompareScreen)
        chart = compare.query_one("#compare-chart", MetricChart)
        assert set(chart.series) == {"flickr8k-muon", "flickr8k-lr-high"}
        assert chart.chart_title == "mean_r1"
        assert chart.series["flickr8k-lr-high"] == [(100, eval_values(100)["mean_r1"])]

        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert ("m", "Metric") in app.screen.keys and ("?", "Help") in app.screen.keys
        await pilot.press("escape", "t")
        assert app.theme == "textual-light"
        await pilot.press("t")
        assert app.theme == "textual-dark"
        await pilot.press("escape", "s")
        await pilot.pause()
        assert isinstance(app.screen, SearchScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)


async def test_run_screen_shows_progress_eta_error_system_and_log(dash_store):
    runs = {run.name: run for run in fill_demo_store()}
    muon = runs["flickr8k-muon"]
    app = make_app(now=T0 + 600 + 1000)
    async with app.run_test(size=(100, 30)) as pilot:
        app.push_screen(RunScreen(muon.id))
        await settle(pilot)
        screen = app.screen
        # 250 of 400 steps in 1000 s → 150 steps left at 0.25 steps/s = 600 s
        assert "ETA 0:10:00" in plain(screen.query_one("#run-timing"))
        assert "elapsed 0:16:40" in plain(screen.query_one("#run-timing"))
        assert not screen.query_one("#run-error").display
        loss = screen.query_one("#chart-loss", MetricChart)
        assert loss.series["loss"] == [(s, step_values(s)["loss"]) for s in range(0, 251, 10)]
        assert set(loss.series) == {"loss", "loss_i2t", "loss_i2a", "loss_t2a"}

        await pilot.press("3")
        await settle(pilot)
        assert set(screen.query_one("#chart-lr", MetricChart).series) == {"fast", "mid", "slow"}
        await pilot.press("6")
        await settle(pilot)
        latest = plain(screen.query_one("#sys-latest"))
        assert "GPU 0" in latest and "6.44 GB / 25.77 GB" in latest and "210 W" in latest
        await pilot.press("7")
        await settle(pilot)
        log = screen.query_one("#log-tail")
        assert log.lines[-1] == f"epoch 3 step 300 loss {step_values(300)['loss']:.3f}"

        app.pop_screen()
        app.push_screen(RunScreen(runs["flickr8k-lr-high"].id))
        await settle(pilot)
        error = app.screen.query_one("#run-error")
        assert error.display
        assert "CUDA out of memory" in plain(error)


# ---- layout: what fits at 80x24 and what a dialog shows


async def test_every_screen_fits_80x24_with_all_its_keys(dash_store):
    runs = {run.name: run for run in fill_demo_store()}
    async with make_app().run_test(size=(80, 24)) as pilot:
        app = pilot.app
        await settle(pilot)
        table = app.screen.query_one("#runs-table", KeyedTable)
        header = screen_lines(app)[2]
        assert fits_its_width(table), header
        assert "started" in header and "best R@1" in header
        assert "device" not in header  # hidden first when the columns do not all fit
        rows = table_rows(app, "#runs-table")
        assert {row[1] for row in rows} == set(runs)  # names whole, not cut
        assert [row[-1] for row in rows] == ["11-14 22:42", "11-14 22:32", "11-14 22:22",
                                             "11-14 22:12"]
        assert footer_keys_missing(app) == []

        await pilot.press("down", "down", "enter")  # flickr8k-muon
        await settle(pilot)
        assert isinstance(app.screen, RunScreen) and footer_keys_missing(app) == []
        await pilot.press("s")  # the search starts with the run in view
        await pilot.pause()
        assert isinstance(app.screen, SearchScreen) and app.screen.run_ref == "flickr8k-muon"
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("p")
        await settle(pilot)
        assert isinstance(app.screen, CheckpointsScreen) and footer_keys_missing(app) == []
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, SearchScreen) and footer_keys_missing(app) == []
        await pilot.press("escape", "escape", "escape", "c")
        await settle(pilot)
        assert isinstance(app.screen, CompareScreen) and footer_keys_missing(app) == []

    async with make_app().run_test(size=(120, 30)) as pilot:  # room for every column
        await settle(pilot)
        table = pilot.app.screen.query_one("#runs-table", KeyedTable)
        assert [c.label.plain for c in table.ordered_columns][-2:] == ["device", "started"]
        assert fits_its_width(table)
        await pilot.resize_terminal(80, 24)
        await settle(pilot)
        assert "device" not in [c.label.plain for c in table.ordered_columns]
        assert fits_its_width(table)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_stop_dialog_shows_its_whole_question(dash_store, size):
    fill_demo_store()
    async with make_app().run_test(size=size) as pilot:
        await settle(pilot)
        await pilot.press("down", "down", "x")  # flickr8k-muon, running
        await pilot.pause()
        assert isinstance(pilot.app.screen, ConfirmScreen)
        words = " ".join(" ".join(screen_lines(pilot.app)).replace("█", " ").split())
        assert ("Stop run flickr8k-muon? Its worker saves a checkpoint and ends as 'stopped'."
                in words)
        await pilot.press("n")
        await pilot.pause()
        assert isinstance(pilot.app.screen, RunsScreen)
        assert store.get_run(runs_named(pilot.app, "flickr8k-muon")).status == "running"


def runs_named(app: NlmmDash, name: str) -> int:
    return next(run.id for run in app.screen.runs.values() if run.name == name)


async def test_compare_opened_with_nothing_marked_ticks_exactly_what_it_charts(dash_store):
    fill_demo_store()
    async with make_app().run_test(size=(80, 24)) as pilot:
        app = pilot.app
        await settle(pilot)
        await pilot.press("c")  # nothing marked: the run under the cursor, synth-smoke
        await settle(pilot)
        runs_list = app.screen.query_one("#compare-runs", SelectionList)
        chart = app.screen.query_one("#compare-chart", MetricChart)

        def ticks_shown() -> dict[str, bool]:
            """Each run's name and whether its box shows a tick, read from the characters
            alone: ticked and unticked must differ without colour."""
            shown = {}
            for y in range(runs_list.option_count):
                text = "".join(seg.text for seg in runs_list.render_line(y))
                assert text[:3] in ("▐X▌", "▐ ▌"), text
                shown[str(runs_list.get_option_at_index(y).prompt)] = text[:3] == "▐X▌"
            return shown

        assert ticks_shown() == {"synth-smoke": True, "flickr8k-lr-high": False,
                                 "flickr8k-muon": False, "flickr8k-baseline": False}
        assert set(chart.series) == {"synth-smoke"}

        await pilot.press("r", "down", "down", "down")  # the list's highlight starts above it
        assert str(runs_list.get_option_at_index(runs_list.highlighted).prompt) == "flickr8k-muon"
        await pilot.press("space")
        await settle(pilot)
        assert ticks_shown() == {"synth-smoke": True, "flickr8k-lr-high": False,
                                 "flickr8k-muon": True, "flickr8k-baseline": False}
        assert set(chart.series) == {"synth-smoke", "flickr8k-muon"}


async def test_the_new_run_checkbox_shows_its_state_without_colour(dash_store):
    async with make_app().run_test(size=(80, 24)) as pilot:
        app = pilot.app
        await settle(pilot)
        await pilot.press("n")
        await pilot.pause()
        assert isinstance(app.screen, NewRunScreen)

        def box_line() -> str:
            return next(line for line in screen_lines(app) if "offline synthetic corpus" in line)

        assert "▐ ▌ offline synthetic corpus" in box_line()
        app.screen.query_one("#newrun-synthetic").focus()
        await pilot.press("space")
        await pilot.pause()
        assert "▐X▌ offline synthetic corpus" in box_line()
        assert app.screen.form().synthetic


async def test_system_tab_says_no_gpu_once_for_a_host_only_run(dash_store):
    cpu_only = add_run("cpu-only", "finished", steps=100, gpu=False)
    with_gpu = add_run("with-gpu", "finished", steps=100)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(RunScreen(cpu_only.id))
        await settle(pilot)
        await pilot.press("6")
        await settle(pilot)
        text = "\n".join(screen_lines(app))
        assert text.count("no GPU") == 1
        assert "GPU 0" not in text  # neither in the table nor as flat sparklines
        assert "host CPU" in text and "host RAM" in text

        app.pop_screen()
        app.push_screen(RunScreen(with_gpu.id))
        await settle(pilot)
        await pilot.press("6")
        await settle(pilot)
        text = "\n".join(screen_lines(app))
        assert "no GPU" not in text
        assert "GPU 0 util" in text and "GPU 0 mem" in text


# ---- search and checkpoint results without a trained model (the worker test below has one)


class RecordingSearchers:
    """Stands in for the app's SearcherCache: answers every query with hits of the gallery asked
    for (auto: images), whose captions are `caption`, and records each target."""

    def __init__(self, caption: str) -> None:
        self.caption = caption
        self.targets: list[str | None] = []
        self.queries: list[tuple[str | None, Path | None, Path | None]] = []
        self.loaded = SimpleNamespace(checkpoint_path=Path("stub.pt"))

    def get(self, checkpoint: Path | None, run: str | None) -> RecordingSearchers:
        return self

    def query(self, *, text: str | None, image: Path | None, audio: Path | None,
              target: str | None, k: int) -> list[SearchHit]:
        self.targets.append(target)
        self.queries.append((text, image, audio))
        modality = target or "image"
        return [SearchHit(rank, 1.0 - rank / 10, modality, f"item{rank}", self.caption,
                          None if modality == "text" else f"/gallery/item{rank}.jpg")
                for rank in range(1, 4)]


async def test_search_reruns_on_a_new_target_and_ends_cut_captions_with_an_ellipsis(dash_store):
    caption = ("a brown dog with a red collar runs along the beach beside a child who is "
               "building a sandcastle while the waves roll in")
    searchers = RecordingSearchers(caption)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(SearchScreen(searchers, checkpoint=Path("stub.pt")))
        await pilot.pause()
        target = app.screen.query_one("#search-target", Select)
        target.value = "text"  # before any query: nothing to search yet
        await settle(pilot)
        assert searchers.targets == []
        await pilot.press(*"a dog on the beach", "enter")
        await until(pilot, lambda: len(app.screen.hits) == 3, 10, "the first results")
        assert searchers.targets == ["text"]

        target.value = "image"
        await until(pilot, lambda: searchers.targets == ["text", "image"], 10,
                    "the search to run again")
        await until(pilot, lambda: all(row[2] == "image"
                                       for row in table_rows(app, "#search-results")), 10,
                    "image hits")

        table = app.screen.query_one("#search-results", KeyedTable)
        assert fits_its_width(table)
        shown = [line for line in screen_lines(app) if "item1.jpg" in line][0]
        assert shown.rstrip().endswith("…")
        assert shown.split("item1.jpg")[1].strip().removesuffix("…") in caption
        await pilot.resize_terminal(200, 24)  # room for the whole caption: no ellipsis
        await settle(pilot)
        assert fits_its_width(table)
        shown = [line for line in screen_lines(app) if "item1.jpg" in line][0]
        assert shown.rstrip().endswith(caption)


async def test_a_path_typed_after_ctrl_t_and_tab_searches_and_fires_no_shortcut(dash_store,
                                                                             tmp_path):
    # "new", "search", "theme", "quit": letters that are app shortcuts when no input has focus
    query = tmp_path / "snaps" / "quiet_dog.jpg"
    query.parent.mkdir()
    query.write_bytes(b"not decoded: the searcher is a stand-in")
    searchers = RecordingSearchers("a dog")
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(SearchScreen(searchers, checkpoint=Path("stub.pt")))
        await pilot.pause()
        screen = app.screen
        await pilot.press("ctrl+t", "tab")
        assert not isinstance(app.focused, Input)  # the focus did leave the query field
        await pilot.press(*str(query), "enter")
        await until(pilot, lambda: len(screen.hits) == 3, 10, "the image search")
        assert app.screen is screen and app.theme == "textual-dark"
        assert searchers.queries == [(None, query, None)]
        assert screen.query_one("#search-query", Input).value == str(query)


async def test_test_results_stay_when_the_worker_saves_the_checkpoint_again(dash_store,
                                                                            monkeypatch):
    import nlmm.eval.evaluate

    run = add_run("training", "running", steps=200)
    last = Path(run.log_path).parent / "checkpoints" / "last.pt"
    store.record_checkpoint(run.id, 200, 2, str(last), "last", {}, False, 48 * 2**20)
    evaluated: list[str] = []

    def evaluate_target(target: str, split: str = "test") -> dict:
        evaluated.append(target)
        return {"checkpoint": target, "split": split, "metrics": eval_values(250)}

    # The evaluation itself is exercised with a real checkpoint in the worker test below.
    monkeypatch.setattr(nlmm.eval.evaluate, "evaluate_target", evaluate_target)
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        app.push_screen(CheckpointsScreen(run.id))
        await settle(pilot)
        screen = app.screen
        await pilot.press("down")  # last.pt, below best.pt (both at step 200)
        assert screen.selected().path == str(last)
        await pilot.press("e")
        await until(pilot, lambda: not screen.busy and evaluated, 30, "the evaluation")
        assert evaluated == [str(last)]
        assert "test Recall@K (%) at step 200" in plain(screen.query_one("#ckpt-detail"))

        # The worker saves last.pt again: the store replaces its row (a new id) at step 300.
        store.record_checkpoint(run.id, 300, 3, str(last), "last", {}, False, 48 * 2**20)
        await until(pilot, lambda: ["last", "300"] in [row[1:3]
                                                       for row in table_rows(app, "#ckpt-table")],
                    10, "the new last.pt row")
        await settle(pilot)
        assert screen.selected().path == str(last) and screen.selected().step == 300
        detail = plain(screen.query_one("#ckpt-detail"))
        assert "evaluated at step 200, before the worker saved last.pt again at step 300" in detail
        assert "test Recall@K (%) at step 200" in detail
        assert f"{eval_values(250)['i2t_r1']:.1f}" in detail


@pytest.mark.parametrize("status", ["finished", "stopped"])
async def test_resume_asks_a_finished_run_for_more_epochs(dash_store, monkeypatch, status):
    import nlmm.train.launcher

    run = add_run("done", status, steps=400)
    requests = []
    monkeypatch.setattr(nlmm.train.launcher, "launch",
                        lambda request, **_: requests.append(request) or run)
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        app.push_screen(CheckpointsScreen(run.id))
        await settle(pilot)
        screen = app.screen
        await pilot.press("r")
        await settle(pilot)
        if status == "finished":
            assert isinstance(app.screen, MoreEpochsScreen)  # `--epochs N`, asked for
            assert "finished its 4 epochs" in plain(app.screen.query_one("#epochs-question"))
            await pilot.press("backspace", "0", "enter")
            assert "1 or more" in plain(app.screen.query_one("#epochs-error")) and not requests
            await pilot.press("backspace", "3", "enter")
        await until(pilot, lambda: requests and not screen.busy, 10, "the launch")
        assert app.screen is screen
        assert [(r.resume, r.add_epochs) for r in requests] == \
            [("done", 3 if status == "finished" else None)]


# ---- polling


async def test_a_change_made_during_a_fetch_is_fetched_as_soon_as_it_ends(dash_store,
                                                                          monkeypatch):
    fill_demo_store()
    release = threading.Event()
    fetched: list[str | None] = []
    list_runs = store.list_runs

    def slow_list_runs(**kwargs):
        if not fetched:
            release.wait(30)  # the first fetch is still reading when the filter changes
        fetched.append(kwargs.get("name_like"))
        return list_runs(**kwargs)

    monkeypatch.setattr(store, "list_runs", slow_list_runs)
    app = make_app(poll_s=3600)  # no timer tick: only the change itself may fetch again
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("slash", *"muon")  # four changes while the first fetch waits
        await pilot.pause()
        release.set()
        await until(pilot, lambda: [r[1] for r in table_rows(app, "#runs-table")]
                    == ["flickr8k-muon"], 10, "the filtered runs")
        await settle(pilot)
        assert fetched == [None, "muon"]  # the changes made during a fetch: one fetch after it


async def test_a_screen_polls_once_per_interval(dash_store):
    fill_demo_store()
    async with make_app(poll_s=0.25).run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = pilot.app.screen
        before = screen.polls
        await asyncio.sleep(2.0)
        assert 1 <= screen.polls - before <= 9  # 8 ticks at most; two timers would make 16


def test_a_polling_screen_must_define_fetch_and_apply():
    class ReadsOnly(PollingScreen[int]):
        def fetch(self) -> int:
            return 1

    with pytest.raises(TypeError, match="abstract method apply"):
        ReadsOnly()


def test_workers_report_by_messages_and_only_the_app_starts_or_stops_runs():
    """A worker thread posts a message to its screen or app instead of calling into it, and the
    launcher (start, resume, stop) is reached from the app alone."""
    console = Path(__file__).parent.parent / "console"
    sources = {path.relative_to(console).as_posix(): path.read_text()
               for path in console.rglob("*.py")}
    assert [name for name, text in sources.items() if "call_from_thread" in text] == []
    assert [name for name, text in sources.items()
            if re.search(r"^\s*(from nlmm\.train\.launcher |import nlmm\.train\.launcher)", text,
                         re.MULTILINE)] == ["app.py"]


# ---- live updates from another process


def _write_more_steps(db_url: str, run_id: int, first: int, last: int, batches: int,
                      go: multiprocessing.synchronize.Event) -> None:
    """A worker stand-in in its own process: once `go` is set, logs steps in `batches` flushes,
    0.2 s apart."""
    os.environ["NLMM_DB_URL"] = db_url
    from nlmm import store as child_store

    go.wait(60)
    writer = child_store.MetricWriter(run_id)
    per_batch = (last - first) // batches
    for batch in range(batches):
        start = first + batch * per_batch
        for step in range(start, start + per_batch, 10):
            writer.log(step, step // 100, step_values(step))
        writer.flush()
        time.sleep(0.2)
    writer.log(last, last // 100, step_values(last))
    writer.close()


async def test_run_screen_warns_of_a_collapsed_modality_and_plots_spreads(dash_store):
    run = add_run("collapsing", "finished", steps=100, steps_total=100, epochs_total=1)
    with store.MetricWriter(run.id) as writer:
        for step in range(10, 101, 10):
            writer.log(step, 0, {"spread/image": 0.995, "spread/text": 0.3, "spread/audio": 0.2})
        writer.log(100, 1, {"collapsed/image": 1.0, "collapsed/text": 0.0, "collapsed/audio": 0.0,
                            "test/mean_r1": 12.5, "test_last/mean_r1": 11.0})
    healthy = add_run("healthy", "finished", steps=100, steps_total=100, epochs_total=1)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        app.push_screen(RunScreen(run.id))
        await settle(pilot)
        screen = app.screen
        health = screen.query_one("#run-health")
        assert health.display and "image embeddings collapsed" in plain(health)
        assert "text" not in plain(health)
        assert "test R@1 12.5 (best.pt)" in plain(screen.query_one("#run-summary"))
        await pilot.press("5")
        await settle(pilot)
        spread = screen.query_one("#chart-spread", MetricChart)
        assert set(spread.series) == {"image", "text", "audio"}
        assert spread.series["image"][-1] == (100, 0.995)

        app.pop_screen()
        app.push_screen(RunScreen(healthy.id))
        await settle(pilot)
        assert not app.screen.query_one("#run-health").display


async def test_live_update_when_a_writer_process_adds_metrics(dash_store):
    run = add_run("live", "running", steps=100, steps_total=1000, started=T0)
    # Started before the app: the headless app's stdio cannot be handed to a spawned child.
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    writer = context.Process(target=_write_more_steps,
                             args=(os.environ["NLMM_DB_URL"], run.id, 110, 500, 3, go))
    writer.start()
    try:
        async with make_app(poll_s=0.2).run_test(size=(80, 24)) as pilot:
            app = pilot.app
            app.push_screen(RunScreen(run.id))
            await settle(pilot)
            screen = app.screen
            chart = screen.query_one("#chart-loss", MetricChart)
            assert chart.series["loss"][-1][0] == 100
            plotted, polls = chart.replots, screen.polls

            await asyncio.sleep(0.8)  # polls that find no new data re-plot nothing
            assert screen.polls >= polls + 2
            assert chart.replots == plotted

            go.set()
            await until(pilot, lambda: chart.series["loss"][-1][0] == 500, 30,
                        "the chart to reach step 500")
            assert chart.series["loss"] == [(s, step_values(s)["loss"]) for s in range(0, 501, 10)]
            assert "step 500/1000" in plain(screen.query_one("#run-summary"))
            assert chart.replots > plotted
    finally:
        go.set()
        writer.join(30)
    assert writer.exitcode == 0


# ---- a real worker: stop it from the dash, then search with its checkpoint


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped
    except psutil.NoSuchProcess:
        return True


async def test_start_stop_and_search_a_real_worker_from_the_dash(dash_store, tmp_path, tiny_corpus):
    """New-run dialog → launcher subprocess → stop (x, y) → its checkpoint → search."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.root, corpus)  # the worker's cache goes inside the corpus
    overrides = ("d_model=32 embed_dim=32 n_heads=2 L_mem=2 'depth={text: 1, image: 1, audio: 1}' "
                 "data.image_size=32 data.max_audio_seconds=2.0 data.text_max_len=16 "
                 "train.batch_size=8 train.epochs=500 train.log_every=1 train.eval_every=100")
    run_id = None
    try:
        async with make_app(poll_s=0.3).run_test(size=(80, 24)) as pilot:
            app = pilot.app
            await settle(pilot)
            await pilot.press("n")
            await pilot.pause()
            dialog = app.screen
            assert isinstance(dialog, NewRunScreen)
            dialog.query_one("#newrun-config", Select).value = "tiny_cpu"
            dialog.query_one("#newrun-data", Input).focus()
            await pilot.press(*str(corpus), "tab", *overrides, "tab", *"real-worker", "ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, RunScreen), 120,
                        "the launched run's screen")
            run_screen = app.screen
            run_id = run_screen.run_id
            run = store.get_run(run_id)
            assert run.name == "real-worker" and Path(run.data).is_relative_to(corpus)
            config = json.loads(run.config)
            assert config["d_model"] == 32 and config["train"]["epochs"] == 500

            await until(pilot, lambda: store.get_run(run_id).status == "running"
                        and store.get_run(run_id).step >= 2, 120, "the worker to train")
            pid = store.get_run(run_id).pid
            assert pid is not None and psutil.pid_exists(pid)
            await until(pilot, lambda: bool(run_screen.query_one("#chart-loss", MetricChart).series),
                        30, "the live loss chart")

            await pilot.press("x")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: store.get_run(run_id).status == "stopped", 120,
                        "the worker to stop")
            await until(pilot, lambda: _exited(pid), 60, f"worker process {pid} to exit")
            await until(pilot, lambda: "stopped" in plain(run_screen.query_one("#run-summary")),
                        10, "the run screen to show 'stopped'")

            await pilot.press("p")  # the checkpoint the worker saved on SIGTERM
            await settle(pilot)
            ckpt_screen = app.screen
            assert isinstance(ckpt_screen, CheckpointsScreen)
            assert [row[1] for row in table_rows(app, "#ckpt-table")] == ["last"]
            ckpt = ckpt_screen.selected()
            await pilot.press("x")  # export a bundle
            bundle = Path(ckpt.path).parent.parent / "export" / f"last-step{ckpt.step}"
            await until(pilot, lambda: not ckpt_screen.busy, 60, "the export")
            assert (bundle / "model.safetensors").is_file() and (bundle / "config.yaml").is_file()
            await pilot.press("e")  # evaluate on the test split
            await until(pilot, lambda: ckpt.path in ckpt_screen.results, 120, "the evaluation")
            metrics = ckpt_screen.results[ckpt.path].result["metrics"]
            r1 = [metrics[f"{d}_r1"] for d in DIRECTIONS]
            assert all(0.0 <= v <= 100.0 for v in r1)
            assert metrics["mean_r1"] == pytest.approx(sum(r1) / 6)
            assert "test Recall@K" in plain(ckpt_screen.query_one("#ckpt-detail"))
            await pilot.press("s")
            await pilot.pause()
            search = app.screen
            assert isinstance(search, SearchScreen)
            await pilot.press(*"a red circle", "enter")
            await until(pilot, lambda: bool(search.hits), 120, "search results")
            rows = table_rows(app, "#search-results")
            test_images = set(tiny_corpus.images_in("test"))
            assert [row[0] for row in rows] == [str(i + 1) for i in range(len(test_images))]
            assert {row[3] for row in rows} == test_images  # every test image, each once
            scores = [float(row[1]) for row in rows]
            assert scores == sorted(scores, reverse=True)
            assert all(row[2] == "image" for row in rows)

            search.query_one("#search-target", Select).value = "text"  # same query, captions
            await until(pilot, lambda: search.hits and search.hits[0].modality == "text", 60,
                        "caption results")
            rows = table_rows(app, "#search-results")
            test_captions = {c for image in test_images for c in tiny_corpus.captions[image]}
            assert len(rows) == min(10, len(test_captions))
            assert all(row[2] == "text" and hit.item in test_captions
                       for row, hit in zip(rows, search.hits))
    finally:
        if run_id is not None:
            from nlmm.train.launcher import stop

            stop(str(run_id), timeout=60)
