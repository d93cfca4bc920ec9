"""Start, follow, stop and remove training runs. The CLI and the dashboard both come here.

A run is registered in the store first, then its worker is started as a separate process in its
own session (`python -m nlmm.train.worker RUN_ID`), so a Ctrl-C in the terminal reaches only the
follower, which then asks the worker to checkpoint and stop.

Data-parallel runs (`--nproc`, `--nnodes`) start torchrun in module form
(`python -m torch.distributed.run ... -m nlmm.train.worker RUN_ID`) instead. The first node
(node rank 0) registers the run; every other node only prepares its own copy of the corpus and
joins with `join()`, its ranks taking the run's configuration from rank 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from nlmm import store
from nlmm.config import (Config, config_from_dict, resolve_config, save_config,
                         with_legacy_defaults)
from nlmm.errors import NlmmError
from nlmm.train.checkpoint import load_checkpoint
from nlmm.train.loop import resolve_device

DEFAULT_DATA = Path("data/flickr8k")
SYNTH_DATA = Path("data/synth")
ACTIVE = store.ACTIVE_STATUSES

_processes: dict[int, subprocess.Popen] = {}
# where the train.log of a worker started here began: `follow` shows that worker's lines only
_log_starts: dict[int, int] = {}


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
    nproc: int = 1  # worker processes on this node (one per GPU)
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0, for several nodes

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _check_distributed(req: TrainRequest, device: str) -> None:
    if req.nproc < 1 or req.nnodes < 1:
        raise NlmmError("--nproc and --nnodes must be at least 1.")
    if not 0 <= req.node_rank < req.nnodes:
        raise NlmmError(f"--node-rank must be between 0 and --nnodes - 1 = {req.nnodes - 1}, "
                        f"got {req.node_rank}.")
    if req.nnodes > 1 and not req.rdzv_endpoint:
        raise NlmmError("several nodes need --rdzv-endpoint HOST:PORT, an address of node 0 that "
                        "every node can reach.")
    if req.rdzv_endpoint and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", req.rdzv_endpoint):
        raise NlmmError(f"--rdzv-endpoint must be HOST:PORT, got {req.rdzv_endpoint!r}.")
    if device.startswith("cuda") and req.nproc > torch.cuda.device_count():
        raise NlmmError(f"--nproc {req.nproc} asks for more processes than the "
                        f"{torch.cuda.device_count()} GPU(s) of this node; use --nproc "
                        f"{torch.cuda.device_count()} or fewer.")


def _check_batch_split(batch_size: int, req: TrainRequest) -> None:
    if batch_size % req.world_size:
        raise NlmmError(f"the batch size {batch_size} is the global batch and must split evenly "
                        f"over {req.world_size} processes; use a multiple of {req.world_size}.")


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
        _ensure_corpus(root, console)
    return prepare(root, cfg.data, cfg.vocab_size, progress=console is not None,
                   encoders=cfg.encoders)


def _ensure_corpus(root: Path, console: Console | None) -> None:
    """Completes the corpus in the default folder by downloading; anywhere else a folder without
    a corpus is an error, so that a mistyped --data never starts a 5 GB download."""
    from nlmm.data.flickr import find_text_dir

    if root.resolve() == DEFAULT_DATA.resolve():
        from nlmm.data.download import download_flickr8k, missing_archives

        missing = missing_archives(root)
        if missing:
            if console:
                console.print(f"{root} lacks the contents of {', '.join(missing)}: downloading")
            download_flickr8k(root)
    elif find_text_dir(root) is None:
        raise NlmmError(f"no corpus at {root}; download Flickr8k + FACC there with `nlmm data "
                        f"download --dest {root}`, or write the offline synthetic corpus there "
                        f"with `nlmm data synth --out {root}`.")


def launch(req: TrainRequest, console: Console | None = None) -> store.Run:
    """Register (or reopen, for --resume) a run and start its worker process(es)."""
    device = str(resolve_device(req.device))  # fails before any work when CUDA is absent
    _check_distributed(req, device)
    if req.node_rank > 0:
        raise NlmmError("a node other than node 0 joins a run with join(), it does not launch one.")
    # a worker that died unseen must show as lost before --resume or --name look at its run
    store.mark_lost()
    if req.resume:
        run = _reopen(req, device, console)
    else:
        cfg = resolve_config(req.config or ("tiny_cpu" if req.synthetic else "flickr8k"),
                             req.overrides)
        _check_batch_split(cfg.train.batch_size, req)
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
    _spawn(run, req)
    return store.get_run(run.id)


def join(req: TrainRequest, console: Console | None = None,
         log_path: Path | None = None) -> subprocess.Popen:
    """Node `req.node_rank` > 0 of a data-parallel run: prepare this node's corpus and start its
    ranks, which wait for node 0 at the rendezvous endpoint. Returns the torchrun process.

    The corpus is prepared with the config of `req.resume` when this node's store knows that run
    (a shared PostgreSQL store), else with `req.config` and `req.overrides`, which must then be
    those node 0 was started with. Output goes to `log_path`, else to this terminal.
    """
    device = str(resolve_device(req.device))
    _check_distributed(req, device)
    if req.node_rank == 0:
        raise NlmmError("node 0 registers the run: start it with launch(), not join().")
    known = store.find_run(req.resume) if req.resume else None
    if known is not None:
        cfg = config_from_dict(with_legacy_defaults(json.loads(known.config)), f"run {known.name}",
                               req.overrides)
    else:
        cfg = resolve_config(req.config or ("tiny_cpu" if req.synthetic else "flickr8k"),
                             req.overrides)
    cache = _prepare_corpus(req, cfg, console)
    command = _torchrun_command(req, None, cache.path, device)
    if log_path is None:
        return subprocess.Popen(command, env=_worker_env(req), stdin=subprocess.DEVNULL)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=_worker_env(req), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _reopen(req: TrainRequest, device: str, console: Console | None = None) -> store.Run:
    run = store.get_run(req.resume)
    if run.status in ACTIVE and store.worker_alive(run):
        raise NlmmError(f"run {run.name} is still {run.status}; stop it first with "
                        f"`nlmm runs stop {run.name}`.")
    if run.status == "finished" and not req.add_epochs:
        raise NlmmError(f"run {run.name} already finished (step {run.step} of "
                        f"{run.steps_total}); pass --epochs N to train it N more epochs.")
    last = store.run_dir(run.name) / "checkpoints" / "last.pt"
    cfg_dict = with_legacy_defaults(json.loads(run.config))
    if last.is_file():
        # Read in full now: a damaged file is one clear error here rather than a failed worker.
        progress = load_checkpoint(last)["progress"]
    else:
        # died before its first checkpoint: nothing to continue from, but the run (name,
        # config, corpus, history in the store) is kept and trained again from step 0
        progress = {"epoch": 0}
        if console is not None:
            console.print(f"run {run.name} has no checkpoint yet ({last}): restarting it from "
                          f"step 0 with its config")
    if req.add_epochs:
        cfg_dict["train"]["epochs"] = progress["epoch"] + req.add_epochs
        cfg_dict["train_steps"] = None
    if req.overrides:
        cfg_dict = config_from_dict(cfg_dict, f"run {run.name}", req.overrides).to_dict()
    _check_batch_split(cfg_dict["train"]["batch_size"], req)
    # pid None: the old worker's pid is no longer this run's until the new one registers
    store.update_run(run.id, config=json.dumps(cfg_dict), epochs_total=cfg_dict["train"]["epochs"],
                     device=device, error=None, pid=None)
    store.set_status(run.id, "queued")
    return store.get_run(run.id)


def _torchrun_command(req: TrainRequest, run_id: int | None, cache: Path, device: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={req.nproc}",
               f"--nnodes={req.nnodes}", f"--node-rank={req.node_rank}", "--max-restarts=0"]
    # one node without an endpoint: torchrun picks a free local port itself
    command += [f"--rdzv-endpoint={req.rdzv_endpoint}"] if req.rdzv_endpoint else ["--standalone"]
    command += ["-m", "nlmm.train.worker"] + ([str(run_id)] if run_id is not None else [])
    return command + ["--data", str(cache), "--device", device]


def _worker_env(req: TrainRequest) -> dict[str, str]:
    # the worker resolves the store's relative paths against the same runs folder
    env = dict(os.environ, NLMM_DB_URL=store.current_url(), NLMM_RUNS_DIR=str(store.runs_dir()),
               PYTHONUNBUFFERED="1")
    if req.distributed:
        # torchrun would otherwise set 1 thread per process (and say so in the log)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // req.nproc)))
        # train.log holds the run's own lines, not Gloo's per-rank connection chatter
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return env


def _spawn(run: store.Run, req: TrainRequest) -> subprocess.Popen:
    log_path = store.run_dir(run.name) / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if req.distributed:
        command = _torchrun_command(req, run.id, Path(run.data), run.device)
    else:
        command = [sys.executable, "-m", "nlmm.train.worker", str(run.id)]
    with open(log_path, "ab") as log:
        _log_starts[run.id] = log.tell()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_worker_env(req),
                                start_new_session=True)
    _processes[run.id] = proc
    store.set_status(run.id, "queued", pid=proc.pid)
    return proc


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
    """Show the run until it ends: a progress bar on a terminal, else (CI, nohup, tee) the lines
    of its train.log as they are written. Ctrl-C stops the run cleanly (checkpoint first).

    Returns the exit code for the CLI: 0 finished, 1 failed or lost, 130 stopped.
    """
    run = store.get_run(run_id)
    show = _follow_bar if console.is_terminal else _follow_log
    try:
        show(run_id, console, poll_s)
    except KeyboardInterrupt:
        console.print("stopping: the worker saves a checkpoint first …")
        stop(run.name, timeout=300, signum=signal.SIGINT)
    return _summary(run_id, console)


def _run_over(run_id: int) -> bool:
    return store.get_run(run_id).status not in ACTIVE or _reap(run_id) is not None


def _follow_log(run_id: int, console: Console, poll_s: float) -> None:
    """Copy the run's train.log lines to `console` until the run ends, then the rest."""
    path = store.run_dir(store.get_run(run_id).name) / "train.log"
    offset = _log_starts.get(run_id, path.stat().st_size if path.is_file() else 0)
    partial = b""
    while True:
        over = _run_over(run_id)
        if path.is_file():
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                console.print(line.decode(errors="replace"), markup=False, highlight=False,
                              soft_wrap=True)
        if over:
            if partial:
                console.print(partial.decode(errors="replace"), markup=False, highlight=False,
                              soft_wrap=True)
            return
        time.sleep(poll_s)


def _follow_bar(run_id: int, console: Console, poll_s: float) -> None:
    run = store.get_run(run_id)
    # elapsed and ETA come from the store, so that they add up over the run's earlier workers
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TextColumn("{task.fields[clock]}"))
    noted = False
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(run.name, total=run.steps_total or None, info="starting", clock="")
        while True:
            run = store.get_run(run_id)
            if not noted and run.steps_total:
                noted = True
                note = store.steps_cap_note(json.loads(run.config).get("train_steps"),
                                            run.steps_total, run.epochs_total)
                if note:
                    console.print(f"[yellow]note:[/] {note}")
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
            now = time.time()
            clock = (f"{store.hms(store.elapsed_seconds(run, now))} elapsed, ETA "
                     f"{store.hms(store.eta_seconds(run, now))}")
            bar.update(task, total=run.steps_total or None, completed=run.step or 0, info=info,
                       clock=clock)
            if run.status not in ACTIVE or _reap(run_id) is not None:
                break
            time.sleep(poll_s)


def _summary(run_id: int, console: Console) -> int:
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


def stop(ref: str, timeout: float = 120.0, signum: int = signal.SIGTERM) -> str:
    """Ask a run's worker to checkpoint and stop (SIGTERM, or SIGINT for a Ctrl-C, so train.log
    names what happened); waits up to `timeout` seconds."""
    run = store.get_run(ref)
    if run.status not in ACTIVE:
        return run.status
    if run.host and run.host != socket.gethostname():
        raise NlmmError(f"run {run.name} runs on host {run.host}; stop it there with `nlmm runs "
                        f"stop {run.name}`.")
    if not store.worker_alive(run):
        # no signal: the pid is gone or belongs to another program now
        store.set_status(run.id, "lost", error="the worker process disappeared without reporting")
        return "lost"
    os.kill(run.pid, signum)
    run = wait(run.id, timeout=timeout)
    if run.status in ACTIVE:
        raise NlmmError(f"run {run.name} did not stop within {timeout:.0f} s; try again or kill "
                        f"process {run.pid}.")
    return run.status


def remove(ref: str) -> None:
    """Delete a run's rows and its folder; refuses while it is running."""
    run = store.get_run(ref)
    if run.status in ACTIVE and store.worker_alive(run):
        raise NlmmError(f"run {run.name} is {run.status}; stop it first with `nlmm runs stop "
                        f"{run.name}`.")
    folder = store.run_dir(run.name)
    store.delete_run(run.id)
    if folder.is_dir() and folder.resolve() != store.runs_dir().resolve():
        shutil.rmtree(folder)
