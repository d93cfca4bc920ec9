"""The `nlmm` command as a user runs it: real subprocesses, a real SQLite store, real workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import SMALL_MODEL, cli_sets
from nlmm import store

NLMM = [sys.executable, "-m", "nlmm.cli"]
SMALL = cli_sets(*SMALL_MODEL, "train.log_every=1")


def nlmm(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*NLMM, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def env(isolated_store, tmp_path):
    return dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), COLUMNS="200")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_detached(name: str, synth_root: Path, env: dict, *extra: str) -> store.Run:
    out = nlmm("train", "flickr8k", "--synthetic", "--data", str(synth_root), "--detach",
               "--name", name, "--batch-size", "8", "--device", "cpu", *SMALL, *extra, env=env)
    assert out.returncode == 0, out.stderr
    assert name in out.stdout
    return store.get_run(name)


def test_help_version_and_errors_are_one_sentence(env, tmp_path):
    out = nlmm("--help", env=env)
    assert out.returncode == 0 and "train" in out.stdout and "search" in out.stdout
    assert nlmm("--version", env=env).stdout.startswith("nlmm ")
    bad = nlmm("train", "flickr8k", "--synthetic", "--set", "d_modle=3", env=env)
    assert bad.returncode == 1
    assert "unknown key 'd_modle'" in bad.stderr and "did you mean 'd_model'" in bad.stderr
    assert "Traceback" not in bad.stderr
    debug = nlmm("--debug", "runs", "show", "nope", env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    missing = nlmm("data", "check", str(tmp_path / "empty"), env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_detached_run_listed_stopped_with_checkpoint_and_resumed(synth_root, env):
    run = start_detached("det", synth_root, env, "--epochs", "40")
    wait_for(lambda: (store.get_run("det").step or 0) >= 3, 90, "the worker to take 3 steps")
    listing = nlmm("runs", "ls", env=env)
    assert "det" in listing.stdout and "running" in listing.stdout

    stopped = nlmm("runs", "stop", "det", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    run = store.get_run("det")
    assert run.status == "stopped"
    last = store.last_checkpoint(run.id)
    assert last is not None and Path(last.path).is_file()
    stop_step = last.step
    assert stop_step >= 3

    resumed = nlmm("train", "--resume", "det", "--detach", "--device", "cpu", env=env)
    assert resumed.returncode == 0, resumed.stderr
    wait_for(lambda: (store.get_run("det").step or 0) > stop_step + 1, 90, "steps after resume")
    log = Path(run.log_path).read_text()
    assert "resumed from" in log and f"at step {stop_step}" in log
    nlmm("runs", "stop", "det", env=env)
    series = store.metric_series(run.id, "loss", max_points=10_000)
    steps = [s for s, _ in series]
    assert steps == sorted(set(steps)), "a step was logged twice"
    assert steps[0] == 1 and max(steps) > stop_step


def test_killed_worker_becomes_lost(synth_root, env):
    run = start_detached("victim", synth_root, env, "--epochs", "40")
    wait_for(lambda: store.get_run("victim").status == "running", 60, "the worker to start")
    pid = store.get_run("victim").pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()

    def is_lost():
        out = nlmm("runs", "ls", env=env)
        return "lost" in out.stdout

    wait_for(is_lost, 20, "`nlmm runs ls` to show the run as lost")
    assert time.monotonic() - t0 < 20
    assert store.get_run(run.id).status == "lost"
    rm = nlmm("runs", "rm", "victim", "--yes", env=env)
    assert rm.returncode == 0
    assert store.find_run("victim") is None
    assert not Path(run.log_path).parent.exists()


def test_foreground_train_follows_to_the_end_and_prints_a_summary(synth_root, env):
    out = nlmm("train", "flickr8k", "--synthetic", "--data", str(synth_root), "--name", "fg",
               "--batch-size", "16", "--steps", "6", "--device", "cpu", *SMALL, env=env,
               timeout=300)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "finished" in out.stdout and "image→text" in out.stdout and "mean R@1" in out.stdout
    run = store.get_run("fg")
    assert run.status == "finished" and run.step == 6
    # stdout is a pipe, not a terminal: the run's train.log lines are shown as they are written,
    # a progress line per log window and every phase after the last step
    log = Path(run.log_path).read_text()
    for text in (out.stdout, log):
        progress = [line for line in text.splitlines() if line.startswith("step ")]
        assert progress and progress[-1].startswith("step 6/6 · epoch "), text
        assert " triples/s · ETA " in progress[-1] and " 0 triples/s" not in progress[-1]
        for phase in ("evaluating dev at step 6", "saved best.pt (", "saved last.pt (",
                      "testing the last and the best dev model"):
            assert phase in text, (phase, text)
    keys = set(store.metric_keys(run.id))
    expected = {f"{d}_r{k}" for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t") for k in (1, 5, 10)}
    assert expected | {"mean_r1", "loss", "loss_i2t", "loss_i2a", "loss_t2a", "triples_per_s",
                       "lr/fast", "temperature"} <= keys
    assert not any(key.startswith("lr/") and key != "lr/fast" for key in keys)  # tiny_cpu: one level
    assert {f"test/{k}" for k in expected} <= keys
    assert store.system_samples(run.id), "the worker records host stats"


def test_the_follower_draws_a_bar_on_a_terminal_and_picks_the_exit_code(isolated_store):
    """The launcher hands out the run as it goes; the CLI draws it and maps the outcome to an
    exit code (a run that ended before following starts shows at once)."""
    from io import StringIO

    from rich.console import Console

    from nlmm.cli.follow import follow

    run = store.create_run("shown", {}, "data", "cpu", epochs_total=2, steps_total=10)
    with store.MetricWriter(run.id) as writer:
        writer.log(10, 2, {"loss": 0.5, "triples_per_s": 100.0, "mean_r1": 12.5})
    store.update_run(run.id, step=10, epoch=2)
    store.set_status(run.id, store.RunStatus.FINISHED)
    terminal = Console(file=StringIO(), force_terminal=True, width=200)
    assert follow(run.id, terminal, poll_s=0.01) == 0
    shown = terminal.file.getvalue()
    assert "10/10" in shown and "epoch 2/2" in shown and "loss 0.500" in shown
    assert "dev mean R@1 12.5" in shown

    store.set_status(run.id, store.RunStatus.STOPPED)
    piped = Console(file=StringIO(), width=200)
    assert follow(run.id, piped, poll_s=0.01) == 130
    assert "resume with `nlmm train --resume shown`" in piped.file.getvalue()


def test_model_info_counts_the_real_parameters(env):
    from nlmm.config import resolve_config
    from nlmm.model import NLMM

    out = nlmm("model", "info", "--config", "tiny_nlmm", env=env)
    assert out.returncode == 0, out.stderr
    model = NLMM(resolve_config("tiny_nlmm"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable:,}" in out.stdout
    for level in ("fast", "mid", "slow"):
        assert level in out.stdout


def test_runs_show_names_the_optimizer_and_lr_each_level_trained_with(env):
    from nlmm.config import resolve_config

    cfg = resolve_config("tiny_nlmm", ["train.optimizer=muon", "train.lr=5e-4"])
    assert {level.optimizer for level in cfg.cms_levels} == {"adamw"}  # the per-level defaults
    store.create_run("muon-run", cfg.to_dict(), "data/synth", "cpu", 8, None)
    out = nlmm("runs", "show", "muon-run", env=env)
    assert out.returncode == 0, out.stderr
    shown = " ".join(out.stdout.split())
    assert "fast/1 muon lr 0.0005, mid/4 muon lr 0.00025, slow/16 muon lr 0.000125" in shown
    assert "adamw" not in shown


def test_ctrl_c_in_the_foreground_stops_the_run_and_its_log_says_sigint(synth_root, env):
    proc = subprocess.Popen([*NLMM, "train", "flickr8k", "--synthetic", "--data", str(synth_root),
                             "--name", "ctrlc", "--batch-size", "8", "--device", "cpu", *SMALL,
                             "--epochs", "50"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: store.find_run("ctrlc") is not None
                 and (store.get_run("ctrlc").step or 0) > 0, 180, "the run's first steps")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground `nlmm train`
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    run = store.get_run("ctrlc")
    assert run.status == "stopped" and "resume with" in out
    log = Path(run.log_path).read_text()
    assert "received SIGINT" in log and "SIGTERM" not in log, log
