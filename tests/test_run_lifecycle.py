"""A run's life through the `nlmm` command, with real workers: a runs folder copied as a unit,
resuming a finished run, a `--steps` cap above the epochs, and `runs stop` against a pid that
another program took over."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlmm import store
from test_faults import NLMM, SMALL, TINY_DATA
from test_faults import TINY_STEPS_PER_EPOCH as STEPS_PER_EPOCH


def nlmm(*args: str, runs: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    # one thread per process: on a shared 2-core machine more threads only thrash
    env = dict(os.environ, NLMM_RUNS_DIR=str(runs), COLUMNS="250", OMP_NUM_THREADS="1")
    env.pop("NLMM_DB_URL", None)
    return subprocess.run([*NLMM, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A runs folder holding one finished run `fin` (1 epoch asked to run 5 steps) and the
    output of the command that trained it. Tests copy the folder before they change anything."""
    root = tmp_path_factory.mktemp("lifecycle")
    corpus = root / "corpus"
    shutil.copytree(tiny_corpus.root, corpus)
    runs = root / "runs"
    out = nlmm("train", "flickr8k", "--data", str(corpus), "--name", "fin", "--epochs", "1",
               "--steps", "5", *TINY_DATA, *SMALL, runs=runs)
    assert out.returncode == 0, out.stdout + out.stderr
    return runs, out


def copy_runs(source: Path, target: Path) -> Path:
    """`cp -a source target`: the database and every run folder."""
    shutil.copytree(source, target, symlinks=True)
    return target


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the database, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith("nlmm.db")}


def test_a_steps_cap_above_the_epochs_is_reported(trained):
    runs, out = trained
    note = (f"--steps 5 is more than the {STEPS_PER_EPOCH} steps of 1 epochs "
            f"({STEPS_PER_EPOCH} per epoch), so the run stops after {STEPS_PER_EPOCH} steps")
    assert note in " ".join(out.stdout.split())
    assert note in (runs / "fin" / "train.log").read_text()
    shown = nlmm("runs", "show", "fin", runs=runs)
    assert shown.returncode == 0 and note in " ".join(shown.stdout.split())
    assert "give it 2 epochs in all with --epochs" in " ".join(shown.stdout.split())


def test_a_copied_runs_folder_resumes_and_evaluates_its_own_files(trained, tmp_path):
    template, original = trained[0], copy_runs(trained[0], tmp_path / "runs")
    before, template_before = files_of(original), files_of(template)
    copy = copy_runs(original, tmp_path / "runs2")

    resumed = nlmm("train", "--resume", "fin", "--epochs", "1", runs=copy)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert files_of(original) == before, "the copy wrote into the original runs folder"
    assert files_of(template) == template_before, "the copy wrote into the first runs folder"
    from nlmm.inference.checkpoint import load_checkpoint

    last = copy / "fin" / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["progress"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert f"resumed from {last} at step {STEPS_PER_EPOCH}" in (copy / "fin" / "train.log").read_text()

    evaluated = nlmm("eval", "fin", "--split", "dev", "--json", runs=copy)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["checkpoint"] == str(copy / "fin" / "checkpoints" / "best.pt")
    shown = nlmm("runs", "show", "fin", runs=copy)
    assert str(copy / "fin" / "train.log") in shown.stdout
    assert str(original) + os.sep not in shown.stdout


def test_resuming_a_finished_run_without_epochs_is_refused(trained, tmp_path, monkeypatch):
    runs = copy_runs(trained[0], tmp_path / "runs")
    monkeypatch.setenv("NLMM_RUNS_DIR", str(runs))
    run = store.get_run("fin")
    rows = len(store.metric_keys(run.id)), store.metric_series(run.id, "loss", max_points=1000)
    before = files_of(runs)

    again = nlmm("train", "--resume", "fin", runs=runs)
    assert again.returncode == 1
    assert (f"run fin already finished (step {STEPS_PER_EPOCH} of {STEPS_PER_EPOCH}); pass "
            f"--epochs N to train it N more epochs") in " ".join(again.stderr.split())
    assert "Traceback" not in again.stderr
    assert files_of(runs) == before
    after = store.get_run("fin")
    assert after.status == "finished" and after.ended_at == run.ended_at
    assert (len(store.metric_keys(run.id)), store.metric_series(run.id, "loss", max_points=1000)) == rows


def test_stop_never_signals_a_process_that_reused_the_workers_pid(isolated_store):
    from nlmm.train.launcher import stop

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = store.create_run("gone", {}, "", "cpu", 1, None)
        store.set_status(run.id, "running", pid=stranger.pid)
        # the worker registered an hour before the process that holds its pid now began
        store.update_run(run.id, started_at=time.time() - 3600)
        assert stop("gone", timeout=5) == "lost"
        time.sleep(0.2)
        assert stranger.poll() is None, "runs stop signalled an unrelated process"
        lost = store.get_run("gone")
        assert lost.status == "lost" and "disappeared" in lost.error
    finally:
        stranger.kill()
        stranger.wait(timeout=10)
