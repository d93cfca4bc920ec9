"""`nlmm plot` with several runs: one colour per run everywhere, one line style per curve kind,
legends beside the panels, loss_ttt drawn when logged."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from nlmm import store
from nlmm.metric_names import DIRECTIONS
from nlmm.cli.plots import PANELS, build_figure

LOSSES = ("loss", "loss_i2t", "loss_i2a", "loss_t2a")
R1_KEYS = tuple(f"{d}_r1" for d in DIRECTIONS)


def logged_run(name: str, ttt: bool, offset: float) -> None:
    """A run with 20 steps of losses and 4 evaluations, as a worker logs them."""
    run = store.create_run(name, {}, "data", "cpu", epochs_total=4, steps_total=20)
    with store.MetricWriter(run.id) as writer:
        for step in range(1, 21):
            values = {key: 4.0 - math.log(step) - offset for key in LOSSES}
            if ttt:
                values["loss_ttt"] = 2.0 - 0.05 * step
            writer.log(step, (step - 1) // 5, values)
            if step % 5 == 0:
                recall = {key: 10.0 * step / 5 + offset + i for i, key in enumerate(R1_KEYS)}
                writer.log(step, (step - 1) // 5, {**recall, "mean_r1": sum(recall.values()) / 6})


@pytest.fixture
def three_runs(isolated_store) -> list[str]:
    names = ["baseline", "with-ttt", "bigger"]
    for i, name in enumerate(names):
        logged_run(name, ttt=name == "with-ttt", offset=0.3 * i)
    return names


def test_each_run_keeps_one_colour_and_each_curve_kind_one_style(three_runs):
    fig = build_figure(three_runs)
    axes = fig.axes
    colour_of: dict[str, set] = {name: set() for name in three_runs}
    style_of: dict[str, set] = {}
    for ax in axes:
        for line in ax.get_lines():
            run, key = line.get_label().split(" ")
            colour_of[run].add(to_rgba(line.get_color()))
            style_of.setdefault(key, set()).add((str(line.get_linestyle()), line.get_marker()))
    assert all(len(colours) == 1 for colours in colour_of.values()), colour_of
    assert len({next(iter(c)) for c in colour_of.values()}) == 3  # three distinct colours
    assert all(len(styles) == 1 for styles in style_of.values()), style_of
    directions = [ax for ax in axes if ax.get_title().startswith("Recall@1 per direction")][0]
    assert len(directions.get_lines()) == 18
    assert len({next(iter(style_of[d])) for d in R1_KEYS}) == 6  # six distinguishable styles

    loss = [ax for ax in axes if ax.get_title() == "training loss"][0]
    assert sorted(line.get_label() for line in loss.get_lines()) == \
        ["baseline loss", "bigger loss", "with-ttt loss", "with-ttt loss_ttt"]
    legend_labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert legend_labels == [PANELS[0][1]["loss"][0], PANELS[0][1]["loss_ttt"][0]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == three_runs


def test_legends_stay_off_the_curves(three_runs):
    fig = build_figure(three_runs)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays the figure out, as savefig does
    renderer = canvas.get_renderer()
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    assert len(legends) == 4  # training loss, pairs, directions, and the runs
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(panel) for panel in panels), legend
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)


def test_cli_writes_the_png(three_runs, isolated_store, tmp_path):
    out = tmp_path / "curves.png"
    env = dict(os.environ, NLMM_RUNS_DIR=str(isolated_store))
    done = subprocess.run([sys.executable, "-m", "nlmm.cli", "plot", *three_runs, "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
