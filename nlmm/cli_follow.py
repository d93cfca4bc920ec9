"""`nlmm train` in the foreground: the run shown in the terminal until it ends, then a summary.

On a terminal a progress bar, else (CI, nohup, tee) the lines of its train.log as they are
written. The launcher hands out the run's progress; this module only renders it.
"""

from __future__ import annotations

import json
import signal
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from nlmm import store
from nlmm.train.launcher import log_lines, stop, wait, watch


def follow(run_id: int, console: Console, poll_s: float = 0.5) -> int:
    """Show the run until it ends; Ctrl-C stops it cleanly (checkpoint first).

    Returns the exit code for the CLI: 0 finished, 1 failed or lost, 130 stopped.
    """
    run = store.get_run(run_id)
    try:
        if console.is_terminal:
            _show_bar(run_id, console, poll_s)
        else:
            for line in log_lines(run_id, poll_s):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        console.print("stopping: the worker saves a checkpoint first …")
        stop(run.name, timeout=300, signum=signal.SIGINT)
    return _summary(run_id, console)


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
            clock = (f"{store.hms(store.elapsed_seconds(run, now))} elapsed, ETA "
                     f"{store.hms(store.eta_seconds(run, now))}")
            bar.update(task, total=run.steps_total or None, completed=run.step or 0,
                       info=_progress_info(run), clock=clock)


def _progress_info(run: store.Run) -> str:
    """Epoch, phase and the latest loss, throughput and dev recall, as the bar shows them."""
    latest = store.latest_metrics(run.id, keys=["loss", "triples_per_s", "mean_r1"])
    info = f"epoch {run.epoch or 0}/{run.epochs_total or '?'}"
    if run.phase and run.phase != "training":
        info += f"  {run.phase} …"
    if "loss" in latest:
        info += f"  loss {latest['loss']:.3f}"
    if "triples_per_s" in latest:
        info += f"  {latest['triples_per_s']:.3g} triples/s"
    if "mean_r1" in latest:
        info += f"  dev mean R@1 {latest['mean_r1']:.1f}"
    return info


def _summary(run_id: int, console: Console) -> int:
    run = wait(run_id, timeout=30)
    from nlmm.reports import summary_table

    console.print(summary_table(run))
    if run.status == store.RunStatus.FINISHED:
        return 0
    if run.status == store.RunStatus.STOPPED:
        console.print(f"resume with `nlmm train flickr8k --resume {run.name}`")
        return 130
    if run.error:
        console.print(f"[red]{run.error.strip().splitlines()[0]}[/] (log: {run.log_path})")
    return 1
