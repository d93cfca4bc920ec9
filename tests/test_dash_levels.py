"""The run screen's Levels tab and its warning, read from a real SQLite store written by the
metric writer as the training loop writes `level/<name>/…`."""

from __future__ import annotations

import io
import json

from rich.console import Console
from sqlalchemy import update
from test_dash import add_run, dash_store, make_app, plain, screen_lines, settle  # noqa: F401

from console.run.screen import RunScreen
from console.widgets.chart import MetricChart
from nlmm import store
from nlmm.cli.reports import run_details

LEVELS = [{"name": "fast", "chunk_size": 1}, {"name": "mid", "chunk_size": 4},
          {"name": "slow", "chunk_size": 16}]


def ratio(name: str, step: int) -> float:
    """The fast level moves 1e-3 of its weights a step, mid a chunk's worth, slow next to none."""
    return {"fast": 1e-3, "mid": 4e-3, "slow": 2e-7}[name] * (1 + step / 1000)


def levels_run(name: str, still: bool) -> store.Run:
    run = add_run(name, "running", steps=100, steps_total=400)
    with store.write_session() as session:
        session.exec(update(store.Run).where(store.Run.id == run.id)
                     .values(config=json.dumps({"cms_levels": LEVELS})))
    with store.MetricWriter(run.id) as writer:
        for step in range(10, 101, 10):
            values = {f"level/{lv['name']}/update_ratio": ratio(lv["name"], step)
                      for lv in LEVELS}
            values |= {"level/fast/gain": 0.05, "level/mid/gain": 0.03, "level/slow/gain": 0.0004}
            if still and step == 80:  # the loop flags a level once, when it first sees it
                values["level/slow/still"] = 1.0
            writer.log(step, 1, values)
    return store.get_run(run.id)


async def test_the_levels_tab_shows_each_level_and_warns_of_a_still_one(dash_store):
    still = levels_run("slow-still", still=True)
    moving = levels_run("all-moving", still=False)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(RunScreen(still.id))
        await settle(pilot)
        screen = app.screen
        health = plain(screen.query_one("#run-health"))
        assert "CMS level slow barely moves" in health and "level mid" not in health

        await pilot.press("8")
        await settle(pilot)
        rows = {line.split()[0]: line.split() for line in plain(
            screen.query_one("#levels-table")).splitlines() if line.strip()}
        # level, chunk, update/weights, per step, mean |gain|, the warning
        assert rows["fast"][1:5] == ["1", f"{ratio('fast', 100):.2e}",
                                     f"{ratio('fast', 100):.2e}", "0.0500"]
        assert rows["mid"][1:5] == ["4", f"{ratio('mid', 100):.2e}",
                                    f"{ratio('mid', 100) / 4:.2e}", "0.0300"]
        assert rows["slow"][1:] == ["16", f"{ratio('slow', 100):.2e}",
                                    f"{ratio('slow', 100) / 16:.2e}", "0.0004", "barely", "moves"]
        assert "barely" not in rows["mid"]
        chart = screen.query_one("#chart-levels", MetricChart)
        assert set(chart.series) == {"fast", "mid", "slow"} and chart.log_y
        assert chart.series["slow"][-1] == (100, ratio("slow", 100))
        assert any("update/weights" in line for line in screen_lines(app))  # it fits 80x24

        app.pop_screen()
        app.push_screen(RunScreen(moving.id))
        await settle(pilot)
        assert not app.screen.query_one("#run-health").display


def test_runs_show_prints_a_line_per_level_from_the_same_figures(dash_store):
    levels_run("shown", still=True)
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(run_details("shown"))
    lines = {line.split()[0]: line for line in console.export_text().splitlines()
             if line.startswith("  ")}
    assert f"update/weights {ratio('slow', 100):.2e}, mean |gain| 0.0004 (barely moves)" \
        in lines["slow"]
    assert "barely" not in lines["mid"] and "mean |gain| 0.0500" in lines["fast"]
