"""The dash's one error policy: a failed action (start, resume or stop a run, evaluate or export a
checkpoint, read the store) shows one error notification titled with what could not be done and
worded by the error itself, and the screen that asked stays usable."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from textual.pilot import Pilot
from textual.screen import Screen

from test_dash import add_run, dash_store, make_app, settle, table_rows, until  # noqa: F401

from console.app import NlmmDash
from console.checkpoints.screen import CheckpointsScreen
from console.dialogs.confirm import ConfirmScreen
from console.run.screen import RunScreen
from console.runs.screen import RunsScreen
from nlmm import store
from nlmm.errors import NlmmError


@asynccontextmanager
async def opened(screen: Screen) -> AsyncIterator[tuple[NlmmDash, Pilot]]:
    """The dash with `screen` pushed over its runs list and settled."""
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        app.push_screen(screen)
        await settle(pilot)
        yield app, pilot


def errors(app: NlmmDash) -> list[tuple[str, str]]:
    """(title, message) of each error notification on screen."""
    return [(n.title, n.message) for n in app._notifications if n.severity == "error"]


async def test_a_failed_resume_is_one_titled_error_and_the_screen_stays(dash_store, monkeypatch):
    import nlmm.train.launcher

    run = add_run("done", "stopped", steps=400)
    sentence = "run done has no last.pt to continue from; resume it from best.pt instead."

    def launch(request, **_):
        raise NlmmError(sentence)

    monkeypatch.setattr(nlmm.train.launcher, "launch", launch)
    async with opened(CheckpointsScreen(run.id)) as (app, pilot):
        screen = app.screen
        await pilot.press("r")
        await until(pilot, lambda: bool(errors(app)), 10, "the error")
        assert errors(app) == [("cannot resume the run", sentence)]
        assert app.screen is screen


async def test_a_failed_export_is_one_titled_error_and_frees_the_screen(dash_store, monkeypatch):
    import nlmm.inference.export

    run = add_run("exported", "finished", steps=400)

    def export_bundle(target: str, out: Path, force: bool = False) -> Path:
        raise OSError(f"[Errno 28] No space left on device: '{out}'")

    monkeypatch.setattr(nlmm.inference.export, "export_bundle", export_bundle)
    async with opened(CheckpointsScreen(run.id)) as (app, pilot):
        screen = app.screen
        await pilot.press("x")
        await until(pilot, lambda: not screen.busy, 10, "the export to end")
        [(title, message)] = errors(app)
        assert title == "cannot export the checkpoint" and "No space left on device" in message


async def test_a_run_on_another_host_cannot_be_stopped_from_here(dash_store):
    run = add_run("elsewhere", "running")  # its worker runs on another host
    async with opened(RunScreen(run.id)) as (app, pilot):
        await pilot.press("x")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: bool(errors(app)), 10, "the error")
        [(title, message)] = errors(app)
        assert title == "cannot stop the run" and "runs on host gpu-node-7" in message
        assert isinstance(app.screen, RunScreen)
        assert store.get_run(run.id).status == "running"


async def test_a_store_that_cannot_be_read_is_said_once_until_it_reads_again(dash_store,
                                                                          monkeypatch):
    add_run("listed", "finished")
    failing = {"on": True}
    list_runs = store.list_runs

    def flaky_list_runs(**kwargs):
        if failing["on"]:
            raise NlmmError("the store is locked by another program; close it and try again.")
        return list_runs(**kwargs)

    monkeypatch.setattr(store, "list_runs", flaky_list_runs)
    app = make_app(poll_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        await until(pilot, lambda: screen.polls >= 4, 10, "four failed polls")
        assert errors(app) == [("cannot read the store",
                                "the store is locked by another program; close it and try again.")]
        failing["on"] = False
        await until(pilot, lambda: table_rows(app, "#runs-table"), 10, "the runs")
        app.clear_notifications()
        failing["on"] = True
        await until(pilot, lambda: bool(errors(app)), 10, "the error said again")
        assert len(errors(app)) == 1
