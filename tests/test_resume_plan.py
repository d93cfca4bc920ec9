"""`nlmm train --resume RUN` with `--steps N` / `--epochs N`: N more steps or epochs from where the
run stands, the plan shown as such by `runs ls` and `runs show`, and the lr schedule stretched to
the new end without a second warmup. The CLI tests resume real runs on the hand-written corpus
(3 steps per epoch at batch 8)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_VOCAB, tiny_data_config

from nlmm import store
from nlmm.config import resolve_config
from nlmm.train.plan import Extension, extended_plan
from test_faults import NLMM, SMALL, TINY_DATA
from test_faults import TINY_STEPS_PER_EPOCH as SPE

TINY = ["--config", "tiny_cpu", *TINY_DATA, *SMALL]


def plan(epochs: int, cap: int | None, ext: Extension, step: int, epochs_done: int,
         into: int, spe: int = 10) -> tuple[int, int | None]:
    cfg = resolve_config("tiny_cpu", [f"train.epochs={epochs}"] + ([f"train_steps={cap}"] if cap else []))
    out = extended_plan(cfg, ext, step, epochs_done, into, spe)
    return out.train.epochs, out.train_steps


@pytest.mark.parametrize("case, expected", [
    # a finished run of 3 whole epochs: N more epochs end on an epoch, so no cap is needed
    ((3, None, Extension(epochs=2), 30, 3, 0), (5, None)),
    # ... and N more steps keep the epochs bound when it is passed, else raise it
    ((3, None, Extension(steps=4), 30, 3, 0), (4, 34)),
    # a run stopped 12 steps into a 30-epoch plan: its plan holds 20 more steps
    ((30, None, Extension(steps=20), 12, 1, 2), (30, 32)),
    # ... one more epoch from there: 10 steps more, ending inside epoch 3
    ((30, None, Extension(epochs=1), 12, 1, 2), (3, 22)),
    # ... both: one step, within one more epoch (the issue's `--epochs 1 --steps 1`)
    ((30, None, Extension(steps=1, epochs=1), 12, 1, 2), (3, 13)),
    # a run capped at 10 steps that finished: 20 more steps, the cap moves
    ((8, 10, Extension(steps=20), 10, 1, 0), (8, 30)),
    # skipped batches moved the loader past the step count: the epochs follow the loader
    ((2, None, Extension(epochs=1), 18, 2, 0), (3, 28)),
])
def test_extended_plan(case, expected):
    assert plan(*case) == expected


def test_a_resume_stretches_the_cosine_and_never_repeats_the_warmup(tiny_cache, tmp_path):
    """The resumed lr is that of a run planned to the new end from the start, with the shorter
    of the two warmups: a capped run that had a 1-step warmup does not fall back into 20."""
    import torch

    from nlmm.train.loop import Trainer

    cfg = resolve_config("tiny_cpu", ["d_model=32", "embed_dim=32", "n_heads=2", "L_mem=2",
                                      "train.batch_size=8", "train.epochs=4", "train_steps=2",
                                      f"vocab_size={TINY_VOCAB}"])
    cfg = dataclasses.replace(cfg, data=tiny_data_config())
    trainer = Trainer(cfg, tiny_cache, torch.device("cpu"), tmp_path, sink=None, log=lambda _: None)
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.warmup_steps) == (SPE, 2, 1)
    longer = extended_plan(cfg, Extension(steps=4), 2, 0, 2, trainer.steps_per_epoch)
    trainer.replan(longer)
    assert (trainer.total_steps, trainer.warmup_steps) == (6, 1)
    assert trainer.cfg.train_steps == 6
    uncapped = dataclasses.replace(longer, train_steps=None)  # a short run's warmup would be 20
    trainer.replan(uncapped)
    assert (trainer.total_steps, trainer.warmup_steps) == (4 * SPE, 1)


# ---- real runs -----------------------------------------------------------------------------

def nlmm(*args: str, runs: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, NLMM_RUNS_DIR=str(runs), COLUMNS="250", OMP_NUM_THREADS="1")
    env.pop("NLMM_DB_URL", None)
    return subprocess.run([*NLMM, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_runs(tiny_corpus, tmp_path_factory) -> Path:
    """A runs folder with `capped` (4 epochs asked, --steps 2: finished at step 2, inside its
    first epoch) and `whole` (1 epoch of 3 steps). Tests copy it before resuming."""
    root = tmp_path_factory.mktemp("resume_plan")
    corpus = root / "corpus"
    shutil.copytree(tiny_corpus.root, corpus)
    runs = root / "runs"
    for name, args in (("capped", ["--epochs", "4", "--steps", "2"]), ("whole", ["--epochs", "1"])):
        out = nlmm("train", "flickr8k", "--data", str(corpus), "--name", name, *args, *TINY,
                   runs=runs)
        assert out.returncode == 0, out.stdout + out.stderr
    return runs


def resumed(finished_runs: Path, tmp_path: Path, run: str, *args: str) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(finished_runs, runs, symlinks=True)
    out = nlmm("train", "--resume", run, *args, runs=runs)
    assert out.returncode == 0, out.stdout + out.stderr
    return runs


def shown_plan(runs: Path, name: str) -> tuple[str, str]:
    """(the `runs ls` row of `name`, the progress line of `runs show name`)."""
    listed = nlmm("runs", "ls", runs=runs)
    row = next(line for line in listed.stdout.splitlines() if f" {name} " in line)
    shown = nlmm("runs", "show", name, runs=runs)
    progress = next(line for line in shown.stdout.splitlines() if line.startswith("progress"))
    return " ".join(row.replace("│", " ").split()), " ".join(progress.split())


def trained_steps(runs: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setenv("NLMM_RUNS_DIR", str(runs))
    return [step for step, _ in store.metric_series(store.get_run(name).id, "loss", 1000)]


@pytest.mark.slow
def test_resume_with_steps_trains_that_many_more(finished_runs, tmp_path, monkeypatch):
    """A run capped at 2 steps that finished, `--steps 4`: steps 3-6, within its 4 epochs
    (it used to say "already finished ... pass --epochs N")."""
    runs = resumed(finished_runs, tmp_path, "capped", "--steps", "4")
    row, progress = shown_plan(runs, "capped")
    assert "finished 6/6 2/4" in row
    assert progress == "progress step 6/6, epoch 2/4"
    assert trained_steps(runs, "capped", monkeypatch) == [1, 2, 3, 4, 5, 6]
    log = (runs / "capped" / "train.log").read_text()
    assert "4 more steps: the run now trains to step 6, within 4 epochs" in log
    # the stretched cosine at step 3 of 6, after a 1-step warmup
    lr = dict(store.metric_series(store.get_run("capped").id, "lr/fast", 1000))[3]
    assert lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 5)), rel=1e-5)


@pytest.mark.slow
def test_resume_with_epochs_trains_that_many_more(finished_runs, tmp_path, monkeypatch):
    """2 steps into its first epoch, `--epochs 1`: 3 more steps (not "1/1", not the rest of
    the 4-epoch plan)."""
    runs = resumed(finished_runs, tmp_path, "capped", "--epochs", "1")
    row, progress = shown_plan(runs, "capped")
    assert "finished 5/5 2/2" in row
    assert progress == "progress step 5/5, epoch 2/2"
    assert trained_steps(runs, "capped", monkeypatch) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_resume_with_epochs_and_steps_stops_at_the_first(finished_runs, tmp_path, monkeypatch):
    """`--epochs 1 --steps 1` trains one step (it used to train none and show "2/1")."""
    runs = resumed(finished_runs, tmp_path, "capped", "--epochs", "1", "--steps", "1")
    row, progress = shown_plan(runs, "capped")
    assert "finished 3/3 1/2" in row
    assert progress == "progress step 3/3, epoch 1/2"
    assert trained_steps(runs, "capped", monkeypatch) == [1, 2, 3]


@pytest.mark.slow
def test_resume_of_a_whole_epoch_run_with_more_epochs(finished_runs, tmp_path, monkeypatch):
    """A finished 1-epoch run, `--epochs 2`: epochs 2 and 3, uncapped."""
    runs = resumed(finished_runs, tmp_path, "whole", "--epochs", "2")
    row, progress = shown_plan(runs, "whole")
    assert f"finished {3 * SPE}/{3 * SPE} 3/3" in row
    assert progress == f"progress step {3 * SPE}/{3 * SPE}, epoch 3/3"
    assert trained_steps(runs, "whole", monkeypatch) == list(range(1, 3 * SPE + 1))
    assert "train_steps: null" in (runs / "whole" / "config.yaml").read_text()
