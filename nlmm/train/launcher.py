"""Start, follow, stop and remove training runs. The CLI and the dashboard both come here.

A run is registered in the store first, then its worker is started as a separate process in its
own session (`python -m nlmm.train.worker RUN_ID`, or torchrun for data-parallel runs: see
torchrun.py), so a Ctrl-C in the terminal reaches only the follower, which then asks the worker
to checkpoint and stop.

`--resume RUN` reopens RUN (with `--steps`/`--epochs`: sized for that much more by its worker,
see plan.py); `--resume RUN --data NEW` registers a new run continuing RUN on another corpus
(see lineage.py), unless NEW is the corpus RUN trains on.

For data-parallel runs over several nodes, the first node (node rank 0) registers the run; every
other node only prepares its own copy of the corpus and joins with `join()`, its ranks taking
the run's configuration from rank 0.

Nothing here draws on a terminal: progress is handed out as runs (`watch`) and log lines
(`log_lines`), and notes go to a `notify` callable, for the CLI to render.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from nlmm import store
from nlmm.config import (Config, config_from_dict, flat_keys, resolve_config, save_config,
                         with_legacy_defaults)
from nlmm.data.cache import PreparedCache, prepare
from nlmm.data.corpora.base import CorpusSpec
from nlmm.data.corpus_location import Notify, ensure_corpus_spec, prepare_corpus
from nlmm.data.pack_source import PackedSource, is_pack
from nlmm.data.tokenizer import TextTokenizer
from nlmm.devices import resolve_device
from nlmm.errors import NlmmError
from nlmm.inference.checkpoint import load_checkpoint
from nlmm.train.distributed import DistContext, check_batch_size
from nlmm.train.lineage import save_run_config
from nlmm.train.plan import Extension
from nlmm.train.request import TrainRequest, check_distributed
from nlmm.train.torchrun import worker_command, worker_env

_processes: dict[int, subprocess.Popen] = {}
# where the train.log of a worker started here began: `log_lines` yields that worker's lines only
_log_starts: dict[int, int] = {}


def launch(req: TrainRequest, notify: Notify | None = None) -> store.Run:
    """Register (or reopen, for --resume) a run and start its worker process(es).

    `notify` receives notes on the way (downloads, a resume without a checkpoint); with it the
    corpus preparation also shows progress bars, so pass it only from a terminal.
    """
    device = str(resolve_device(req.device))  # fails before any work when CUDA is absent
    check_distributed(req, device)
    if req.node_rank > 0:
        raise NlmmError("a node other than node 0 joins a run with join(), it does not launch one.")
    ext = Extension(req.add_steps, req.add_epochs) if req.resume else Extension()
    if req.resume and req.data is not None:
        run, ext = _continue(req, device, notify)
    elif req.resume:
        run = _reopen(req, device, notify)
    else:
        run = _register(req, device, notify)
    _spawn(run, req, ext)
    return store.get_run(run.id)


def _requested_config(req: TrainRequest) -> Config:
    return resolve_config(req.config or ("tiny_cpu" if req.synthetic else "flickr8k"),
                          req.overrides)


def open_training_data(req: TrainRequest, cfg: Config,
                       notify: Notify | None) -> PreparedCache | PackedSource:
    """A pack named by --data (a folder or an s3:// URL) as it is, to stream from; any other
    corpus prepared into its feature cache. Either way with every split it needs."""
    packs = [d for d in (req.data if isinstance(req.data, list) else [req.data])
             if is_pack(getattr(d, "path", d))]
    if packs:
        if len(packs) > 1 or isinstance(req.data, list) and len(req.data) > 1:
            raise NlmmError("a pack trains on its own; pack the corpora together (nlmm data "
                            "pack takes one corpus) or prepare them as one mixed cache.")
        if cfg.encoders.backbone("image") or cfg.encoders.backbone("audio"):
            raise NlmmError("pretrained backbone features need a prepared cache; train from the "
                            "corpus folder instead of its pack, or use a config without "
                            "encoders.")
        where = str(getattr(packs[0], "path", packs[0]))
        # a folder by its absolute path: the run's eval and resume may start anywhere
        source = PackedSource(where if "://" in where else str(Path(where).resolve()))
        source.check_splits(tuple(dict.fromkeys(("train", cfg.train.eval_split, "test"))))
        source.check_data(cfg.data)
        if notify:
            notify(f"streaming from the pack in {source.path}")
        return source
    cache = prepare_corpus(req.data, req.synthetic, cfg, notify)
    check_splits(cache, cfg)
    return cache


def check_splits(cache: PreparedCache, cfg: Config) -> None:
    """Refuse a corpus whose train, evaluation or test split is empty, before a worker starts:
    the run would otherwise fail at its first evaluation or at the final test."""
    for split in dict.fromkeys(("train", cfg.train.eval_split, "test")):
        if len(cache.split_captions(split)) == 0:
            where = ", ".join(str(s["path"]) for s in cache.sources)
            raise NlmmError(f"the {split} split of {where} has no rows; give some rows that "
                            f"split (a manifest's split column: train, dev or test), or leave "
                            f"the split column out and nlmm splits the groups 90/5/5.")


def fit_modalities(cfg: Config, available: tuple[str, ...], notify: Notify | None) -> Config:
    """`cfg` with only the towers the corpus can train: an image-text corpus builds no audio
    tower, a text-audio one no image tower."""
    keep = [m for m in cfg.modalities if m in available]
    if len(keep) < 2:
        raise NlmmError(f"the corpus has {' and '.join(available)} but the config asks for "
                        f"modalities {cfg.modalities}; they share fewer than two, so nothing "
                        f"can be trained; set modalities to two of {', '.join(available)}.")
    if keep != list(cfg.modalities):
        if notify:
            dropped = [m for m in cfg.modalities if m not in keep]
            notify(f"the corpus has no {' or '.join(dropped)}: training {' and '.join(keep)} "
                   f"only ({'-'.join(k[0] for k in keep)} retrieval)")
        cfg = dataclasses.replace(cfg, modalities=keep)
    return cfg


def _register(req: TrainRequest, device: str, notify: Notify | None) -> store.Run:
    """A new queued run: its corpus prepared, its folder holding config.yaml, its row stored."""
    cfg = _requested_config(req)
    check_batch_size(cfg.train.batch_size, DistContext(world_size=req.world_size))
    cache = open_training_data(req, cfg, notify)
    cfg = fit_modalities(cfg, cache.modalities(), notify)
    formats = "+".join(dict.fromkeys(cache.manifest.get("formats", ["flickr8k"])))
    name = req.name or store.unique_run_name("synth" if req.synthetic else formats)
    if req.name and store.find_run(req.name) is not None:
        raise NlmmError(f"a run named {req.name!r} exists already; pick another --name or "
                        f"continue it with --resume {req.name}.")
    folder = store.run_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    return store.create_run(name, cfg.to_dict(), str(cache.path), device,
                            epochs_total=cfg.train.epochs, steps_total=None,
                            log_path=str(folder / "train.log"))


def join(req: TrainRequest, notify: Notify | None = None,
         log_path: Path | None = None) -> subprocess.Popen:
    """Node `req.node_rank` > 0 of a data-parallel run: prepare this node's corpus and start its
    ranks, which wait for node 0 at the rendezvous endpoint. Returns the torchrun process.

    The corpus is prepared with the config of `req.resume` when this node's store knows that run
    (a shared PostgreSQL store), else with `req.config` and `req.overrides`, which must then be
    those node 0 was started with. Output goes to `log_path`, else to this terminal.
    """
    device = str(resolve_device(req.device))
    check_distributed(req, device)
    if req.node_rank == 0:
        raise NlmmError("node 0 registers the run: start it with launch(), not join().")
    known = store.find_run(req.resume) if req.resume else None
    if known is not None:
        cfg = config_from_dict(with_legacy_defaults(json.loads(known.config)), f"run {known.name}",
                               req.overrides)
    else:
        cfg = _requested_config(req)
    cache = open_training_data(req, cfg, notify)
    fit_modalities(cfg, cache.modalities(), notify)
    command = worker_command(req, None, cache.path, device)
    if log_path is None:
        return subprocess.Popen(command, env=worker_env(req), stdin=subprocess.DEVNULL)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=worker_env(req), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _resumable(ref: str) -> store.Run:
    """The run `ref`, refused while a worker of it is alive."""
    store.mark_lost()  # a worker that died unseen must show as lost before its run is judged
    run = store.get_run(ref)
    if run.status in store.ACTIVE_STATUSES and store.worker_alive(run):
        raise NlmmError(f"run {run.name} is still {run.status}; stop it first with "
                        f"`nlmm runs stop {run.name}`.")
    return run


def _reopen(req: TrainRequest, device: str, notify: Notify | None,
            checked: bool = False) -> store.Run:
    """RUN queued again for its worker, which continues at its last checkpoint's step and, with
    --steps/--epochs, sizes the run for that much more. `checked`: last.pt was read in full."""
    run = _resumable(req.resume)
    extend = bool(req.add_epochs or req.add_steps)
    if run.status == store.RunStatus.FINISHED and not extend:
        raise NlmmError(f"run {run.name} already finished (step {run.step} of "
                        f"{run.steps_total}); pass --epochs N to train it N more epochs, or "
                        f"--steps N for N more steps.")
    last = store.run_dir(run.name) / "checkpoints" / "last.pt"
    cfg_dict = with_legacy_defaults(json.loads(run.config))
    if last.is_file():
        if not checked:
            # Read in full now: a damaged file is one clear error here rather than a failed worker.
            load_checkpoint(last)
    elif notify is not None:
        # died before its first checkpoint: nothing to continue from, but the run (name,
        # config, corpus, history in the store) is kept and trained again from step 0
        start = f"its parent {run.parent}'s last.pt" if run.parent else "step 0"
        notify(f"run {run.name} has no checkpoint yet ({last}): restarting it from {start} "
               f"with its config")
    if req.overrides:
        cfg_dict = config_from_dict(cfg_dict, f"run {run.name}", req.overrides).to_dict()
    check_batch_size(cfg_dict["train"]["batch_size"], DistContext(world_size=req.world_size))
    # The worker sizes an extended run; until then its plan is unknown rather than the old one.
    # pid None: the old worker's pid is no longer this run's until the new one registers.
    plan = {"epochs_total": None, "steps_total": None} if extend else \
        {"epochs_total": cfg_dict["train"]["epochs"]}
    store.update_run(run.id, config=json.dumps(cfg_dict), device=device, error=None, pid=None,
                     **plan)
    store.set_status(run.id, store.RunStatus.QUEUED)
    return store.get_run(run.id)


# What a run continued on another corpus may set differently from its parent: how it trains.
# Everything else (the model, its towers, the features and tokenizer) is the parent's.
CONTINUED_MAY_CHANGE = ("train.", "train_steps", "precision.", "data.augment.")


def _continue(req: TrainRequest, device: str, notify: Notify | None
              ) -> tuple[store.Run, Extension]:
    """`--resume RUN --data NEW`: a new run that continues RUN on NEW from RUN's last.pt, NEW
    prepared with RUN's tokenizer; or RUN itself reopened when NEW is the corpus it trains on.
    Returns the run and what its worker adds to the plan."""
    parent = _resumable(req.resume)
    if req.nnodes > 1:
        # node 0 prepares NEW with the parent's tokenizer from its last.pt; a joining node has
        # neither, and its own tokenizer would give other token ids (its cache key differs)
        raise NlmmError(f"continuing run {parent.name} on another corpus runs on one node; "
                        f"drop --nnodes (--nproc still uses every GPU of this node).")
    last = store.run_dir(parent.name) / "checkpoints" / "last.pt"
    if not last.is_file():
        raise NlmmError(f"run {parent.name} has no last.pt to continue from ({last}); resume it "
                        f"without --data, which trains it again on its own corpus.")
    payload = load_checkpoint(last)  # in full: a damaged file is one clear error here
    cfg = _continued_config(parent, req)
    specs = [d if isinstance(d, CorpusSpec) else CorpusSpec(Path(d))
             for d in (req.data if isinstance(req.data, list) else [req.data])]
    packs = [str(s.path) for s in specs if is_pack(str(s.path))]
    if packs:
        where = packs[0] if "://" in packs[0] else str(Path(packs[0]).resolve())
        if len(specs) == 1 and where == parent.data:  # the pack the run streams from
            return _reopen(req, device, notify, checked=True), Extension(req.add_steps,
                                                                         req.add_epochs)
        raise NlmmError("a run continues on a corpus folder, which is prepared with its "
                        "tokenizer; a pack carries a tokenizer of its own, so give the folder "
                        "the pack was made from.")
    specs = [ensure_corpus_spec(s, notify) for s in specs]
    cache = prepare(specs, cfg.data, cfg.vocab_size, progress=notify is not None,
                    encoders=cfg.encoders, tokenizer=TextTokenizer.from_json(payload["tokenizer"]))
    if cache.path.resolve() == Path(parent.data).resolve():
        # --data names the corpus the run trains on: a plain resume
        return _reopen(req, device, notify, checked=True), Extension(req.add_steps,
                                                                     req.add_epochs)
    missing = [m for m in cfg.modalities if m not in cache.modalities()]
    if missing:
        raise NlmmError(f"run {parent.name}'s model has {' and '.join(missing)} tower(s) but "
                        f"the corpus has no {' or '.join(missing)}; continue it on a corpus "
                        f"with {', '.join(cfg.modalities)}.")
    check_splits(cache, cfg)
    check_batch_size(cfg.train.batch_size, DistContext(world_size=req.world_size))
    formats = "+".join(dict.fromkeys(cache.manifest.get("formats", ["flickr8k"])))
    name = req.name or store.unique_run_name(formats)
    if req.name and store.find_run(req.name) is not None:
        raise NlmmError(f"a run named {req.name!r} exists already; pick another --name.")
    folder = store.run_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, folder / "config.yaml", parent.name)
    run = store.create_run(name, cfg.to_dict(), str(cache.path), device,
                           epochs_total=cfg.train.epochs, steps_total=None, parent=parent.name,
                           log_path=str(folder / "train.log"))
    if notify is not None:
        where = ", ".join(str(s["path"]) for s in cache.sources)
        notify(f"continuing run {parent.name} (its last.pt, step "
               f"{payload['progress']['global_step']}) on {where} as the new run {name}: its "
               f"model, tokenizer and optimizer state; {parent.name} stays as it is")
    return run, Extension()


def _continued_config(parent: store.Run, req: TrainRequest) -> Config:
    """The parent's config for a run on another corpus: --epochs and --steps are that run's
    own (default: the parent's epochs, no cap), other options and --set change how it trains
    but never the model or its data features."""
    stored = with_legacy_defaults(json.loads(parent.config))
    kept = config_from_dict(stored, f"run {parent.name}")
    raw = {**stored, "train_steps": req.add_steps,
           "train": {**stored["train"], **({"epochs": req.add_epochs} if req.add_epochs else {})}}
    cfg = config_from_dict(raw, f"run {parent.name}", req.overrides)
    before, after = flat_keys(kept.to_dict()), flat_keys(cfg.to_dict())
    changed = [k for k in after if after[k] != before.get(k)
               and (not k.startswith(CONTINUED_MAY_CHANGE) or k == "train.optimizer")]
    if changed:
        raise NlmmError(f"a run continued on another corpus keeps its parent's model, features "
                        f"and optimizers, but {changed[0]} would change from "
                        f"{before.get(changed[0])!r} to {after[changed[0]]!r}; leave it out, or "
                        f"train a new run.")
    return cfg


# Where a run records how it was started, so that `--resume` without --nproc starts as many
# processes as the run had.
LAUNCH_FILE = "launch.json"


def launch_nproc(run_name: str) -> int:
    """The --nproc RUN was last started with (1 when it recorded none, or is unknown)."""
    run = store.find_run(run_name)
    try:
        return int(json.loads((store.run_dir(run.name) / LAUNCH_FILE).read_text())["nproc"])
    except (AttributeError, OSError, ValueError, KeyError):
        return 1


def _spawn(run: store.Run, req: TrainRequest, ext: Extension) -> subprocess.Popen:
    log_path = store.run_dir(run.name) / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    (log_path.parent / LAUNCH_FILE).write_text(json.dumps({"nproc": req.nproc}))
    command = worker_command(req, run.id, run.data, run.device)
    # the worker reads them after its own: torchrun hands the module every argument after it
    command += [a for flag, n in (("--add-steps", ext.steps), ("--add-epochs", ext.epochs)) if n
                for a in (flag, str(n))]
    with open(log_path, "ab") as log:
        _log_starts[run.id] = log.tell()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=worker_env(req),
                                start_new_session=True)
    _processes[run.id] = proc
    store.set_status(run.id, store.RunStatus.QUEUED, pid=proc.pid)
    return proc


def _reap(run_id: int) -> int | None:
    """Exit code of a worker this process started, once it has ended (reaping the zombie)."""
    proc = _processes.get(run_id)
    return proc.poll() if proc is not None else None


def _run_over(run: store.Run) -> bool:
    return run.status not in store.ACTIVE_STATUSES or _reap(run.id) is not None


def wait(run_id: int, timeout: float | None = None, poll_s: float = 0.3) -> store.Run:
    """Block until the run leaves queued/running (or timeout); returns the run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = store.get_run(run_id)
        code = _reap(run_id)
        if run.status not in store.ACTIVE_STATUSES:
            return run
        if code is not None:
            # the worker ended without recording an outcome (killed, or died on import)
            time.sleep(poll_s)
            run = store.get_run(run_id)
            if run.status in store.ACTIVE_STATUSES:
                store.set_status(run_id, store.RunStatus.FAILED,
                                 error=f"worker exited with code {code} before recording a "
                                       "result; see its log")
                run = store.get_run(run_id)
            return run
        if deadline is not None and time.monotonic() > deadline:
            return run
        time.sleep(poll_s)


def watch(run_id: int, poll_s: float = 0.5) -> Iterator[store.Run]:
    """The run as the store has it, every `poll_s` seconds, until it ends: the last one yielded
    has left queued/running, or its worker (started here) has exited. `wait` then has the
    outcome of a worker that died without recording one."""
    while True:
        run = store.get_run(run_id)
        yield run
        if _run_over(run):
            return
        time.sleep(poll_s)


def log_lines(run_id: int, poll_s: float = 0.5) -> Iterator[str]:
    """The lines of the run's train.log as they are written, until the run ends, then the rest:
    those of the worker started here, else those written from now on."""
    path = store.run_dir(store.get_run(run_id).name) / "train.log"
    offset = _log_starts.get(run_id, path.stat().st_size if path.is_file() else 0)
    partial = b""
    while True:
        over = _run_over(store.get_run(run_id))
        if path.is_file():
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if over:
            if partial:
                yield partial.decode(errors="replace")
            return
        time.sleep(poll_s)


def stop(ref: str, timeout: float = 120.0, signum: int = signal.SIGTERM) -> str:
    """Ask a run's worker to checkpoint and stop (SIGTERM, or SIGINT for a Ctrl-C, so train.log
    names what happened); waits up to `timeout` seconds. Returns the run's status."""
    run = store.get_run(ref)
    if run.status not in store.ACTIVE_STATUSES:
        return run.status
    if run.host and run.host != socket.gethostname():
        raise NlmmError(f"run {run.name} runs on host {run.host}; stop it there with `nlmm runs "
                        f"stop {run.name}`.")
    if not store.worker_alive(run):
        # no signal: the pid is gone or belongs to another program now
        store.set_status(run.id, store.RunStatus.LOST,
                         error="the worker process disappeared without reporting")
        return store.RunStatus.LOST
    os.kill(run.pid, signum)
    run = wait(run.id, timeout=timeout)
    if run.status in store.ACTIVE_STATUSES:
        raise NlmmError(f"run {run.name} did not stop within {timeout:.0f} s; try again or kill "
                        f"process {run.pid}.")
    return run.status


def remove(ref: str) -> None:
    """Delete a run's rows and its folder; refuses while it is running."""
    run = store.get_run(ref)
    if run.status in store.ACTIVE_STATUSES and store.worker_alive(run):
        raise NlmmError(f"run {run.name} is {run.status}; stop it first with `nlmm runs stop "
                        f"{run.name}`.")
    folder = store.run_dir(run.name)
    store.delete_run(run.id)
    if folder.is_dir() and folder.resolve() != store.runs_dir().resolve():
        shutil.rmtree(folder)
