"""`nlmm train … | tee` as a user runs it: Ctrl-C to the pipeline's process group, SIGTERM or
SIGHUP (a closed terminal) end with the worker stopped, last.pt written and the run marked
stopped, however the pipe's reader fares."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlmm import store


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["ctrl-c", "sigterm", "sighup"])
def test_a_piped_run_stops_with_a_checkpoint_on_a_signal(synth_root: Path, tmp_path: Path,
                                                          signum: int) -> None:
    runs = tmp_path / "runs"
    train = [sys.executable, "-m", "nlmm.cli", "train", "flickr8k", "--synthetic", "--data",
             str(synth_root), "--config", "tiny_cpu", "--device", "cpu", "--epochs", "50",
             "--name", "piped", "--set", "train.log_every=1"]
    pipeline = f"{shlex.join(train)} | tee {shlex.quote(str(tmp_path / 'out.log'))}"
    env = dict(os.environ, NLMM_RUNS_DIR=str(runs), COLUMNS="200")
    # a session of its own: the shell, nlmm and tee form the process group a terminal signals
    shell = subprocess.Popen(["bash", "-c", pipeline], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.environ["NLMM_RUNS_DIR"] = str(runs)  # the store this test reads (isolated_store resets)
    try:
        wait_for(lambda: (r := store.find_run("piped")) is not None and (r.step or 0) >= 2,
                 180, "the run's second step")
        target = shell.pid if signum == signal.SIGTERM else -shell.pid
        if signum == signal.SIGTERM:  # a process manager signals nlmm alone
            nlmm = subprocess.run(["pgrep", "-f", "-P", str(shell.pid), "nlmm.cli train"],
                                  capture_output=True, text=True).stdout.split()
            target = int(nlmm[0]) if nlmm else shell.pid
            os.kill(target, signum)
        else:
            os.killpg(shell.pid, signum)
        # (bash itself may exit at once on SIGHUP, before nlmm has forwarded the stop)
        wait_for(lambda: store.get_run("piped").status not in store.ACTIVE_STATUSES, 300,
                 "the run to end")
        run = store.get_run("piped")
        assert run.status == store.RunStatus.STOPPED, (run.status, shell.stderr.read())
        assert (runs / "piped" / "checkpoints" / "last.pt").is_file()
        wait_for(lambda: not store.worker_alive(run), 60, "the worker to exit")
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)


def test_a_failure_reaches_a_piped_terminal_as_one_sentence() -> None:
    from nlmm.cli.follow import without_tracebacks

    log = ["training boom on cpu: 34 steps", "Traceback (most recent call last):",
           '  File "loop.py", line 1, in fit', "nlmm.errors.NlmmError: training diverged", "",
           "error: training diverged", "a later line"]
    assert list(without_tracebacks(iter(log))) == ["training boom on cpu: 34 steps",
                                                   "a later line"]
