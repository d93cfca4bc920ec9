"""The quality bench's protocol: picks are made on dev by search arms only, the coordinate search
visits every value from the best so far, a budget stops a run on its own clock, and the TTT bench scores all six
directions or none."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_bench as qb  # noqa: E402
import ttt_bench  # noqa: E402


def arm_run(lr: float, dev: float, test: float, grid: bool = True, name: str = "nlmm") -> dict:
    setting = qb.Setting(lr, 0.98, "cosine", 32)
    return {"arm": qb.Arm(name, setting, 0), "grid": grid,
            "metrics": {"dev_mean_r1": dev, "mean_r1": test}}


def test_the_pick_is_the_best_dev_figure_of_the_search_arms():
    runs = [arm_run(1e-3, dev=40.0, test=30.0), arm_run(3e-3, dev=35.0, test=60.0),
            arm_run(3e-4, dev=90.0, test=90.0, grid=False)]  # another seed's arm: no vote
    assert qb.best(runs, "nlmm").lr == 1e-3


def test_the_coordinate_search_varies_one_field_at_a_time_from_the_best():
    stages = qb.search_stages("coordinate", [3e-4, 1e-3], [0.98, 0.999], ["constant", "cosine"],
                              [32, 128])
    assert [s.lr for s in stages[0](None)] == [3e-4, 1e-3]
    assert {(s.beta2, s.schedule, s.batch) for s in stages[0](None)} == {(0.98, "constant", 32)}
    at = qb.Setting(1e-3, 0.999, "constant", 32)
    assert [s.beta2 for s in stages[1](at)] == [0.98, 0.999]  # the one measured is skipped later
    assert all(s.lr == 1e-3 for stage in stages[1:] for s in stage(at))
    assert [s.batch for s in stages[3](at)] == [32, 128]
    grid = qb.search_stages("grid", [3e-4, 1e-3], [0.98, 0.999], ["constant", "cosine"], [32, 128])
    assert len(grid[0](None)) == 8 and [s.batch for s in grid[1](at)] == [128]


def test_a_budget_is_spent_on_its_own_clock_and_calibrates_the_schedule():
    now = [0.0]
    steps, estimates = [], []

    def step(batch: int) -> None:
        steps.append(batch)
        now[0] += 0.5

    results = qb.timed_training(iter(range(1000)), step, [10.0], lambda: {"mean_r1": 1.0},
                                estimates.append, clock=lambda: now[0])
    assert results[10.0]["steps"] == 20 and len(steps) == 20
    assert estimates == [0.5, 0.5]  # at steps 8 and 16


def test_ttt_scores_all_six_directions_or_none():
    torch.manual_seed(0)
    emb = {m: torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
           for m in ("image", "text", "audio")}
    owner = {m: torch.arange(6) for m in emb}
    scored = ttt_bench.query_protocol(emb, emb, owner)
    assert len([k for k in scored if k.endswith("_r1") and k != "mean_r1"]) == 6
    without_audio = {m: e for m, e in emb.items() if m != "audio"}
    with pytest.raises(RuntimeError, match="i2a, a2i, t2a, a2t could not be scored"):
        ttt_bench.query_protocol(without_audio, without_audio, owner)
