"""`nlmm train` in the foreground: the run shown in the terminal until it ends, then a summary.

On a terminal a progress bar, else (CI, nohup, tee) the lines of its train.log as they are
written. The launcher hands out the run's progress; this module only renders it.

Ctrl-C (SIGINT), SIGTERM and a closed terminal (SIGHUP) all checkpoint and stop the run: the
worker runs in a session of its own, so the signal reaches only this process, which forwards
it. Under a pipe (`| tee`) Ctrl-C ends the reader too, so every write after it is guarded: a
broken pipe silences the output, it never kills this process before the stop is forwarded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from nlmm import store
from nlmm.cli.reports import epoch_text, error_sentence, summary_table
from nlmm.train.launcher import log_lines, stop, wait, watch


class _Hangup(KeyboardInterrupt):
    """SIGTERM or SIGHUP while following: handled like Ctrl-C."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Hangup(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so no later write raises."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _say(console: Console, text: str) -> None:
    try:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    except (BrokenPipeError, OSError):
        _silence_stdout()


def without_tracebacks(lines: Iterator[str]) -> Iterator[str]:
    """train.log's lines less a failure's traceback and its `error:` line: the terminal gets
    the failure as one sentence in the summary; the traceback stays in train.log."""
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line.startswith("error: "):
            in_traceback = False
            continue
        if not in_traceback:
            yield line


def for_the_terminal(lines: Iterator[str], run_name: str) -> Iterator[str]:
    """train.log's lines as a piped terminal shows them: without a failure's traceback and
    without the worker's closing `run NAME finished` line, which the summary after them says
    (`run NAME: finished`) with the figures."""
    closing = {f"run {run_name} {status}" for status in store.ENDED_STATUSES}
    return (line for line in without_tracebacks(lines) if line.strip() not in closing)


def follow(run_id: int, console: Console, poll_s: float = 0.5) -> int:
    """Show the run until it ends; Ctrl-C, SIGTERM or SIGHUP stop it cleanly (checkpoint first).

    Returns the exit code for the CLI: 0 finished, 1 failed or lost, 130 stopped.
    """
    run = store.get_run(run_id)
    try:
        with _stop_signals():
            try:
                if console.is_terminal:
                    _show_bar(run_id, console, poll_s)
                else:
                    for line in for_the_terminal(log_lines(run_id, poll_s), run.name):
                        console.print(line, markup=False, highlight=False, soft_wrap=True)
            except OSError:  # BrokenPipeError among them
                # the reader went away without a signal (`| head`): the run goes on, unseen
                _silence_stdout()
                return _summary(run_id, console)
    except KeyboardInterrupt as exc:
        why = str(exc) or "Ctrl-C"
        # forwarded first: under a pipe the next write may find the reader gone
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_error = None
        try:
            stop(run.name, timeout=300, signum=signal.SIGINT)
        except Exception as err:  # said after the note, then the summary shows the state
            stop_error = err
        _say(console, f"{why}: stopping {run.name}; the worker saved a checkpoint first")
        if stop_error is not None:
            _say(console, f"error: {stop_error}")
    try:
        return _summary(run_id, console)
    except (BrokenPipeError, OSError):
        _silence_stdout()
        return 130


def _show_bar(run_id: int, console: Console, poll_s: float) -> None:
    run = store.get_run(run_id)
    # elapsed and ETA come from the store, so that they add up over the run's earlier workers
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TextColumn("{task.fields[clock]}"))
    noted = False
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(run.name, total=run.steps_total or None, info="starting", clock="")
        for run in watch(run_id, poll_s):
            if not noted and run.steps_total:
                noted = True
                note = store.steps_cap_note(json.loads(run.config).get("train_steps"),
                                            run.steps_total, run.epochs_total)
                if note:
                    console.print(f"[yellow]note:[/] {note}")
            now = time.time()
            latest = store.latest_points(run.id, keys=["loss", "triples_per_s", "mean_r1"])
            rate = latest["triples_per_s"][1] if "triples_per_s" in latest else None
            clock = (f"{store.hms(store.elapsed_seconds(run, now))} elapsed, ETA "
                     f"{store.hms(store.eta_seconds(run, now, rate))}")
            bar.update(task, total=run.steps_total or None, completed=run.step or 0,
                       info=progress_info(run, latest), clock=clock)


def progress_info(run: store.Run, latest: dict[str, tuple[int, float]]) -> str:
    """Epoch, phase and the latest loss, throughput and dev recall, as the bar shows them.

    `latest`: (step, value) per key. The bar counts steps from the heartbeat, which runs ahead
    of the metrics the worker writes in batches, so a loss from an earlier step says which."""
    info = f"epoch {epoch_text(run)}"
    if run.phase and run.phase != "training":
        info += f"  {run.phase} …"
    if "loss" in latest:
        step, loss = latest["loss"]
        info += f"  loss {loss:.3f}" + ("" if step == (run.step or 0) else f" (step {step})")
    if "triples_per_s" in latest:
        info += f"  {latest['triples_per_s'][1]:.3g} triples/s"
    if "mean_r1" in latest:
        info += f"  dev mean R@1 {latest['mean_r1'][1]:.1f}"
    return info


def _summary(run_id: int, console: Console) -> int:
    run = wait(run_id, timeout=30)
    console.print(summary_table(run))
    if run.status == store.RunStatus.FINISHED:
        return 0
    if run.status == store.RunStatus.STOPPED:
        console.print(f"resume with `nlmm train --resume {run.name}`")
        return 130
    sentence = error_sentence(run.error)
    if sentence:
        console.print(Text.assemble((sentence, "red"), f" (traceback in {run.log_path})"))
    return 1
