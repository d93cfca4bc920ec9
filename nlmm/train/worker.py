"""Training worker process: `python -m nlmm.train.worker RUN_ID`.

Started by the launcher (CLI or dashboard) as its own process and session, or once per device by
torchrun for data-parallel runs. Rank 0 (the only process of a one-device run) reads the run's
config from the store, trains, and reports everything back through the store: metrics in
batched transactions, checkpoints, a heartbeat, and the final status (`finished`, `stopped`
on SIGTERM/SIGINT after a checkpoint, `failed` with a one-sentence reason and the traceback).
The other ranks never touch the store: rank 0 sends them the configuration and any resumed
state, and they open the feature cache given with --data (prepared on their own node).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import torch

from nlmm import store
from nlmm.config import Config, config_from_dict, with_legacy_defaults
from nlmm.data.backbone_features import ensure_features
from nlmm.data.cache import PreparedCache
from nlmm.data.pack_source import PackedSource, is_pack
from nlmm.devices import resolve_device
from nlmm.errors import NlmmError
from nlmm.train import distributed
from nlmm.inference.checkpoint import discard_partial_writes, load_checkpoint
from nlmm.train.distributed import DistContext
from nlmm.train.lineage import save_run_config
from nlmm.train.loop import CheckpointEvent, Progress, Trainer
from nlmm.train.plan import Extension, extended_plan

HEARTBEAT_S = 1.0


def _log(msg: str) -> None:
    print(msg, flush=True)


class NullSink:
    """Where ranks other than 0 send their metrics: rank 0 logs the global figures."""

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass


def _heartbeat_loop(run_id: int, trainer_ref: list, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        trainer = trainer_ref[0] if trainer_ref else None
        try:
            if trainer is None:
                store.heartbeat(run_id)
            else:
                store.heartbeat(run_id, step=trainer.progress.global_step,
                                epoch=trainer.progress.epoch_number, phase=trainer.phase)
        except Exception as exc:  # a busy store must not kill training; the next beat retries
            _log(f"heartbeat failed: {exc}")


def _set_threads(ctx: DistContext) -> None:
    """All cores, shared by the processes of this node, unless OMP_NUM_THREADS says otherwise
    (torch already follows it; on a busy machine fewer threads than cores train faster)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_world_size))


def _open_cache(path: Path | str, key: str | None) -> PreparedCache | PackedSource:
    """The run's prepared cache, or the pack it streams from (a folder or an s3:// URL)."""
    if is_pack(path):
        cache = PackedSource(path)
        if key is not None and cache.key != key:
            raise NlmmError(f"the pack {path} (key {cache.key}) differs from rank 0's (key "
                            f"{key}); give every node the same pack.")
        return cache
    cache = PreparedCache.open(Path(path))
    if key is not None and cache.key != key:
        raise NlmmError(f"the feature cache {path} (key {cache.key}) differs from rank 0's (key "
                        f"{key}); start every node with the same corpus, --config and --set.")
    return cache


def run_worker(run_id: int | None, data: str | None = None, device_name: str | None = None,
               ext: Extension = Extension()) -> int:
    """Train one run (rank 0) or one rank's share of it, `ext` more than its plan when a
    resume asked for more; returns the process exit code."""
    ctx = distributed.context_from_env()
    if ctx.is_main and run_id is None:
        _log("error: rank 0 needs the run id; start the first node without --node-rank "
             "(or with --node-rank 0).")
        return 2
    try:
        try:
            device = distributed.init_process_group(ctx, resolve_device(device_name or "auto"))
        except BaseException as exc:
            if ctx.is_main:
                _record_failure(run_id, exc)
            raise
        if ctx.is_main:
            return _run_main(run_id, ctx, device, ext)
        return _run_follower(ctx, device, data)
    finally:
        distributed.destroy_process_group(ctx)


def _record_failure(run_id: int, exc: BaseException) -> None:
    """Log the traceback and mark the run failed with a one-sentence reason first."""
    tb = traceback.format_exc()
    reason = str(exc) if isinstance(exc, NlmmError) else f"{type(exc).__name__}: {exc}"
    _log(tb)
    _log(f"error: {reason}")
    store.set_status(run_id, "failed", error=f"{reason}\n\n{tb}")


def continued_start(payload: dict[str, Any]) -> dict[str, Any]:
    """A parent's last.pt made into the starting state of a run continuing it: its weights and
    optimizer state, with the progress, dev best and loader position of a run at step 0.

    A level whose open chunk was applied when the parent ended (the checkpoint then carries the
    chunk-start weights too) starts from the weights the parent was tested with, the chunk
    committed; a chunk still open in a stopped parent is carried over and applied at this
    run's first chunk boundary."""
    state = dict(payload)
    state["progress"] = vars(Progress())
    state.pop("loader", None)
    levels = {}
    for name, entry in payload["scheduler"].get("levels", {}).items():
        if "chunk_start" in entry:
            entry = {k: v for k, v in entry.items() if k != "chunk_start"} | {"accum": {}}
        levels[name] = entry
    state["scheduler"] = {**payload["scheduler"], "levels": levels}
    return state


def _extend(trainer: Trainer, ext: Extension) -> Config:
    """Size the resumed run for `ext` more than where it stands; every rank does the same."""
    p = trainer.progress
    cfg = extended_plan(trainer.cfg, ext, p.global_step, p.epoch,
                        p.batch_in_epoch // trainer.cfg.train.accumulate, trainer.steps_per_epoch)
    trainer.replan(cfg)
    return cfg


def _run_follower(ctx: DistContext, device: torch.device, data: str | None) -> int:
    try:
        spec, payload = distributed.broadcast_from_main(None, ctx, device)
        _set_threads(ctx)
        cfg = config_from_dict(with_legacy_defaults(spec["config"]), f"run {spec['name']}")
        cache = _open_cache(data or spec["cache"], spec["cache_key"])
        if isinstance(cache, PreparedCache):
            cache = ensure_features(cache, cfg.encoders, device, progress=False)
        trainer = Trainer(cfg, cache, device, Path(spec["run_dir"]), NullSink(),
                          log=lambda _msg: None, dist=ctx)
        trainer.model.load_pretrained_backbones()
        if payload is not None:
            trainer.load_state_dict(payload)
        if spec["extend"]:
            _extend(trainer, Extension(**spec["extend"]))
        trainer.fit()
        return 0
    except BaseException:
        _log(f"rank {ctx.rank}: {traceback.format_exc()}")
        return 1


def _run_main(run_id: int, ctx: DistContext, device: torch.device, ext: Extension) -> int:
    run = store.get_run(run_id)
    stop_event = threading.Event()

    def _on_signal(signum, _frame):
        _log(f"received {signal.Signals(signum).name}: checkpointing and stopping")
        stop_event.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    store.set_status(run.id, "running", pid=os.getpid(), host=socket.gethostname(),
                     processes=ctx.world_size)
    trainer_ref: list[Trainer] = []
    beat_stop = threading.Event()
    beat = threading.Thread(target=_heartbeat_loop, args=(run.id, trainer_ref, beat_stop),
                            daemon=True)
    beat.start()
    writer = store.MetricWriter(run.id)
    sink = writer
    monitor = None
    try:
        cfg_dict = json.loads(run.config)
        cfg = config_from_dict(with_legacy_defaults(cfg_dict), f"run {run.name}")
        _set_threads(ctx)
        if not ctx.enabled:
            device = resolve_device(run.device)
        cache = _open_cache(run.data, None)
        # the run's own folder in the runs folder this worker was started for: a copied runs
        # folder trains its own copy of the run and never writes into the original
        run_dir = store.run_dir(run.name)
        for path in discard_partial_writes(run_dir / "checkpoints"):
            _log(f"removed {path.name}, left by a worker that died while saving a checkpoint")
        last = run_dir / "checkpoints" / "last.pt"
        where_to = "cpu" if ctx.enabled else device
        payload = load_checkpoint(last, map_location=where_to) if last.is_file() else None
        start = None
        if payload is None and run.parent:
            # a run continuing its parent on another corpus, before its own first checkpoint
            start = store.run_dir(run.parent) / "checkpoints" / "last.pt"
            if not start.is_file():
                raise NlmmError(f"run {run.name} continues run {run.parent}, whose last.pt "
                                f"({start}) is gone; continue it again from a run that has one.")
            payload = continued_start(load_checkpoint(start, map_location=where_to))
        if ctx.enabled:
            spec = {"name": run.name, "config": cfg_dict, "cache": run.data,
                    "cache_key": cache.key, "run_dir": str(run_dir),
                    "extend": {"steps": ext.steps, "epochs": ext.epochs} if ext else None}
            distributed.broadcast_from_main((spec, payload), ctx, device)
        if cfg.train.mirrors:
            from nlmm.train.mirrors import TeeSink, build_mirrors

            sink = TeeSink(writer, build_mirrors(cfg.train.mirrors, run.name, run_dir,
                                                 cfg.to_dict()))
        from nlmm.train.sysmon import SystemMonitor

        monitor = SystemMonitor(run.id)
        monitor.start()
        if monitor.note:
            _log(monitor.note)

        def on_checkpoint(ev: CheckpointEvent) -> None:
            sink.flush()
            store.record_checkpoint(run.id, ev.progress.global_step, ev.progress.epoch_number,
                                    str(ev.path), ev.kind, ev.metrics, ev.kind == "best", ev.nbytes)

        # frozen pretrained backbones: their cached features replace pixels / waveforms
        if isinstance(cache, PreparedCache):
            cache = ensure_features(cache, cfg.encoders, device, progress=False)
        trainer = Trainer(cfg, cache, device, run_dir, sink, on_checkpoint, stop_event, _log,
                          dist=ctx)
        # before the checkpoint, which replaces them on a resume
        trainer.model.load_pretrained_backbones()
        if payload is not None:
            trainer.load_state_dict(payload)
            if start is not None:
                _log(f"continuing run {run.parent} on this corpus from its {start}: its model, "
                     f"tokenizer and every level's optimizer state, at step 0 of this run")
            else:
                _log(f"resumed from {last} at step {trainer.progress.global_step}")
        if ext:
            cfg = _extend(trainer, ext)
            store.update_run(run.id, config=json.dumps(cfg.to_dict()))
            save_run_config(cfg, run_dir / "config.yaml", run.parent)
            _log(f"{ext.describe()}: the run now trains to step {trainer.total_steps}, within "
                 f"{cfg.train.epochs} epochs; its lr schedule is that of a run planned so from "
                 f"the start ({cfg.train.schedule}, warmup {trainer.warmup_steps} steps)")
        trainer_ref.append(trainer)
        store.update_run(run.id, steps_total=trainer.total_steps, epochs_total=cfg.train.epochs)
        where = f"{ctx.world_size} processes ({device.type})" if ctx.enabled else str(device)
        _log(f"training {run.name} on {where}: {trainer.total_steps} steps, "
             f"{trainer.steps_per_epoch} per epoch")
        note = store.steps_cap_note(cfg.train_steps, trainer.total_steps, cfg.train.epochs)
        if note:
            _log(f"note: {note}")
        if not ext and trainer.warmup_steps < cfg.train.warmup_steps:
            _log(f"note: --steps {trainer.total_steps} makes a short run: its warmup is "
                 f"{trainer.warmup_steps} steps (of train.warmup_steps={cfg.train.warmup_steps}) "
                 f"and its cosine decays over the {trainer.total_steps} steps")
        status = trainer.fit()
        sink.close()
        store.heartbeat(run.id, step=trainer.progress.global_step,
                        epoch=trainer.progress.epoch_number)
        store.set_status(run.id, status)
        _log(f"run {run.name} {status}")
        return 0
    except BaseException as exc:
        try:
            sink.close()
        except Exception:  # the failure being recorded matters more than the last metrics
            pass
        _record_failure(run.id, exc)
        return 1
    finally:
        beat_stop.set()
        if monitor is not None:
            monitor.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nlmm.train.worker")
    parser.add_argument("run_id", type=int, nargs="?",
                        help="the run to train (rank 0; other ranks get it from rank 0)")
    parser.add_argument("--data", help="this node's feature cache or pack (ranks other than 0)")
    parser.add_argument("--device", help="auto, cpu or cuda (default: the run's device)")
    parser.add_argument("--add-steps", type=int, help="a resume: train this many more steps")
    parser.add_argument("--add-epochs", type=int, help="a resume: train this many more epochs")
    args = parser.parse_args(argv)
    sys.exit(run_worker(args.run_id, args.data, args.device,
                        Extension(args.add_steps, args.add_epochs)))


if __name__ == "__main__":
    main()
