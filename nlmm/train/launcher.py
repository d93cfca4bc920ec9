"""Start, follow, stop and remove training runs. The CLI and the dashboard both come here.

A run is registered in the store first, then its worker is started as a separate process in its
own session (`python -m nlmm.train.worker RUN_ID`), so a Ctrl-C in the terminal reaches only the
follower, which then asks the worker to checkpoint and stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from nlmm import store
from nlmm.config import Config, config_from_dict, resolve_config, save_config
from nlmm.errors import NlmmError
from nlmm.train.loop import resolve_device

DEFAULT_DATA = Path("data/flickr8k")
SYNTH_DATA = Path("data/synth")
ACTIVE = ("queued", "running")

_processes: dict[int, subprocess.Popen] = {}


@dataclass
class TrainRequest:
    data: Path | None = None
    synthetic: bool = False
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    device: str = "auto"
    name: str | None = None
    resume: str | None = None
    add_epochs: int | None = None


def _prepare_corpus(req: TrainRequest, cfg: Config, console: Console | None):
    from nlmm.data.cache import prepare

    if req.synthetic:
        root = req.data or SYNTH_DATA
        if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
            from nlmm.data.synth import synth_corpus

            if console:
                console.print(f"writing the offline synthetic corpus to {root}")
            # the builtin voice makes the same corpus on every machine, espeak-ng or not;
            # overwrite finishes a corpus whose writing was cut short (text files come last)
            synth_corpus(root, engine="builtin", overwrite=True, progress=console is not None)
    else:
        root = req.data or DEFAULT_DATA
        if not (root / "Flickr8k_text").is_dir():
            from nlmm.data.download import download_flickr8k

            if console:
                console.print(f"{root} holds no corpus yet: downloading Flickr8k + FACC")
            download_flickr8k(root)
    return prepare(root, cfg.data, cfg.vocab_size, progress=console is not None)


def launch(req: TrainRequest, console: Console | None = None) -> store.Run:
    """Register (or reopen, for --resume) a run and start its worker process."""
    device = str(resolve_device(req.device))  # fails before any work when CUDA is absent
    if req.resume:
        run = _reopen(req, device)
    else:
        cfg = resolve_config(req.config or ("tiny_cpu" if req.synthetic else "flickr8k"),
                             req.overrides)
        cache = _prepare_corpus(req, cfg, console)
        name = req.name or store.unique_run_name("synth" if req.synthetic else "flickr8k")
        if req.name and store.find_run(req.name) is not None:
            raise NlmmError(f"a run named {req.name!r} exists already; pick another --name or "
                            f"continue it with --resume {req.name}.")
        folder = store.run_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder / "config.yaml")
        run = store.create_run(name, cfg.to_dict(), str(cache.path), device,
                               epochs_total=cfg.train.epochs, steps_total=None,
                               log_path=str(folder / "train.log"))
    _spawn(run)
    return store.get_run(run.id)


def _reopen(req: TrainRequest, device: str) -> store.Run:
    run = store.get_run(req.resume)
    if run.status in ACTIVE and _alive(run.pid):
        raise NlmmError(f"run {run.name} is still {run.status}; stop it first with "
                        f"`nlmm runs stop {run.name}`.")
    last = store.run_dir(run.name) / "checkpoints" / "last.pt"
    if run.log_path:
        last = Path(run.log_path).parent / "checkpoints" / "last.pt"
    if not last.is_file():
        raise NlmmError(f"run {run.name} has no checkpoint to resume from ({last}); start a new "
                        "run instead.")
    cfg_dict = json.loads(run.config)
    if req.add_epochs:
        from nlmm.train.checkpoint import load_checkpoint

        progress = load_checkpoint(last)["progress"]
        cfg_dict["train"]["epochs"] = progress["epoch"] + req.add_epochs
        cfg_dict["train_steps"] = None
    if req.overrides:
        cfg_dict = config_from_dict(cfg_dict, f"run {run.name}", req.overrides).to_dict()
    store.update_run(run.id, config=json.dumps(cfg_dict), epochs_total=cfg_dict["train"]["epochs"],
                     device=device, error=None)
    store.set_status(run.id, "queued")
    return store.get_run(run.id)


def _spawn(run: store.Run) -> subprocess.Popen:
    log_path = Path(run.log_path) if run.log_path else store.run_dir(run.name) / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NLMM_DB_URL=store.current_url(), PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nlmm.train.worker", str(run.id)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    _processes[run.id] = proc
    store.set_status(run.id, "queued", pid=proc.pid)
    return proc


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(run_id: int) -> int | None:
    """Exit code of a worker this process started, once it has ended (reaping the zombie)."""
    proc = _processes.get(run_id)
    return proc.poll() if proc is not None else None


def wait(run_id: int, timeout: float | None = None, poll_s: float = 0.3) -> store.Run:
    """Block until the run leaves queued/running (or timeout); returns the run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = store.get_run(run_id)
        code = _reap(run_id)
        if run.status not in ACTIVE:
            return run
        if code is not None:
            # the worker ended without recording an outcome (killed, or died on import)
            time.sleep(poll_s)
            run = store.get_run(run_id)
            if run.status in ACTIVE:
                store.set_status(run_id, "failed", error=f"worker exited with code {code} before "
                                 "recording a result; see its log")
                run = store.get_run(run_id)
            return run
        if deadline is not None and time.monotonic() > deadline:
            return run
        time.sleep(poll_s)


def follow(run_id: int, console: Console, poll_s: float = 0.5) -> int:
    """Show a progress bar until the run ends. Ctrl-C stops the run cleanly (checkpoint first).

    Returns the exit code for the CLI: 0 finished, 1 failed or lost, 130 stopped.
    """
    run = store.get_run(run_id)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    interrupted = False
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(run.name, total=run.steps_total or None, info="starting")
        try:
            while True:
                run = store.get_run(run_id)
                latest = store.latest_metrics(run.id, keys=["loss", "triples_per_s", "mean_r1"])
                info = f"epoch {run.epoch or 0}/{run.epochs_total or '?'}"
                if "loss" in latest:
                    info += f"  loss {latest['loss']:.3f}"
                if "triples_per_s" in latest:
                    info += f"  {latest['triples_per_s']:.0f} triples/s"
                if "mean_r1" in latest:
                    info += f"  dev mean R@1 {latest['mean_r1']:.1f}"
                bar.update(task, total=run.steps_total or None, completed=run.step or 0, info=info)
                if run.status not in ACTIVE or _reap(run_id) is not None:
                    break
                time.sleep(poll_s)
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        console.print("stopping: the worker saves a checkpoint first …")
        stop(run.name, timeout=300)
    run = wait(run_id, timeout=30)
    from nlmm.reports import summary_table

    console.print(summary_table(run))
    if run.status == "finished":
        return 0
    if run.status == "stopped":
        console.print(f"resume with `nlmm train flickr8k --resume {run.name}`")
        return 130
    if run.error:
        console.print(f"[red]{run.error.strip().splitlines()[0]}[/] (log: {run.log_path})")
    return 1


def stop(ref: str, timeout: float = 120.0) -> str:
    """Ask a run's worker to checkpoint and stop (SIGTERM); waits up to `timeout` seconds."""
    run = store.get_run(ref)
    if run.status not in ACTIVE:
        return run.status
    if not _alive(run.pid):
        store.set_status(run.id, "lost")
        return "lost"
    os.kill(run.pid, signal.SIGTERM)
    run = wait(run.id, timeout=timeout)
    if run.status in ACTIVE:
        raise NlmmError(f"run {run.name} did not stop within {timeout:.0f} s; try again or kill "
                        f"process {run.pid}.")
    return run.status


def remove(ref: str) -> None:
    """Delete a run's rows and its folder; refuses while it is running."""
    run = store.get_run(ref)
    if run.status in ACTIVE and _alive(run.pid):
        raise NlmmError(f"run {run.name} is {run.status}; stop it first with `nlmm runs stop "
                        f"{run.name}`.")
    folder = Path(run.log_path).parent if run.log_path else store.run_dir(run.name)
    store.delete_run(run.id)
    if folder.is_dir() and folder.resolve() != store.runs_dir().resolve():
        shutil.rmtree(folder)
