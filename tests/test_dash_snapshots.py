"""SVG snapshots of the runs, run and search screens at 80x24 and 120x40.

The store is filled by the real writers with fixed times, the app's clock is fixed and the time
zone is UTC, so every render is the same. Update with `pytest --snapshot-update` after a
deliberate change and look at the report before committing the new files.
"""

from __future__ import annotations

import pytest
from test_dash import T0, dash_store, fill_demo_store, make_app  # noqa: F401  (dash_store: fixture)
from textual.pilot import Pilot

from console.run.screen import RunScreen

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
NOW = T0 + 600 + 3725  # 1:02:05 into the running run


async def settle(pilot: Pilot) -> None:
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_runs_screen(dash_store, snap_compare, size):
    fill_demo_store()
    assert snap_compare(make_app(now=NOW), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_run_screen(dash_store, snap_compare, size):
    running = [run for run in fill_demo_store() if run.status == "running"][0]

    async def open_run(pilot: Pilot) -> None:
        await settle(pilot)
        pilot.app.push_screen(RunScreen(running.id))
        await settle(pilot)

    assert snap_compare(make_app(now=NOW), terminal_size=size, run_before=open_run)


@pytest.mark.parametrize("size", SIZES)
def test_search_screen(dash_store, snap_compare, size):
    fill_demo_store()

    async def open_search(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("s")
        await pilot.press(*"a dog runs on the beach")
        await pilot.pause()

    assert snap_compare(make_app(now=NOW), terminal_size=size, run_before=open_search)
