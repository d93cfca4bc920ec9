"""Training worker process: `python -m nlmm.train.worker RUN_ID`.

Started by the launcher (CLI or dashboard) as its own process and session. It reads the run's
config from the store, trains, and reports everything back through the store: metrics in
batched transactions, checkpoints, a heartbeat, and the final status (`finished`, `stopped`
on SIGTERM/SIGINT after a checkpoint, `failed` with the traceback).
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

import torch

from nlmm import store
from nlmm.config import config_from_dict
from nlmm.data.cache import PreparedCache
from nlmm.train.checkpoint import load_checkpoint
from nlmm.train.loop import CheckpointEvent, Trainer, resolve_device

HEARTBEAT_S = 2.0


def _log(msg: str) -> None:
    print(msg, flush=True)


def _heartbeat_loop(run_id: int, trainer_ref: list, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        trainer = trainer_ref[0] if trainer_ref else None
        try:
            if trainer is None:
                store.heartbeat(run_id)
            else:
                store.heartbeat(run_id, step=trainer.progress.global_step,
                                epoch=trainer.progress.epoch)
        except Exception as exc:  # a busy store must not kill training; the next beat retries
            _log(f"heartbeat failed: {exc}")


def run_worker(run_id: int) -> int:
    run = store.get_run(run_id)
    stop_event = threading.Event()

    def _on_signal(signum, _frame):
        _log(f"received {signal.Signals(signum).name}: checkpointing and stopping")
        stop_event.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    store.set_status(run.id, "running", pid=os.getpid(), host=socket.gethostname())
    trainer_ref: list[Trainer] = []
    beat_stop = threading.Event()
    beat = threading.Thread(target=_heartbeat_loop, args=(run.id, trainer_ref, beat_stop),
                            daemon=True)
    beat.start()
    writer = store.MetricWriter(run.id)
    sink = writer
    monitor = None
    try:
        cfg = config_from_dict(json.loads(run.config), f"run {run.name}")
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        device = resolve_device(run.device)
        cache = PreparedCache.open(Path(run.data))
        run_dir = Path(run.log_path).parent if run.log_path else store.run_dir(run.name)
        if cfg.train.mirrors:
            from nlmm.train.mirrors import TeeSink, build_mirrors

            sink = TeeSink(writer, build_mirrors(cfg.train.mirrors, run.name, run_dir,
                                                 cfg.to_dict()))
        from nlmm.sysmon import SystemMonitor

        monitor = SystemMonitor(run.id)
        monitor.start()
        if monitor.note:
            _log(monitor.note)

        def on_checkpoint(ev: CheckpointEvent) -> None:
            sink.flush()
            store.record_checkpoint(run.id, ev.progress.global_step, ev.progress.epoch,
                                    str(ev.path), ev.kind, ev.metrics, ev.kind == "best", ev.nbytes)

        trainer = Trainer(cfg, cache, device, run_dir, sink, on_checkpoint, stop_event, _log)
        last = run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            trainer.load_state_dict(load_checkpoint(last, map_location=device))
            _log(f"resumed from {last} at step {trainer.progress.global_step}")
        trainer_ref.append(trainer)
        store.update_run(run.id, steps_total=trainer.total_steps, epochs_total=cfg.train.epochs)
        _log(f"training {run.name} on {device}: {trainer.total_steps} steps, "
             f"{trainer.steps_per_epoch} per epoch")
        status = trainer.fit()
        sink.close()
        store.heartbeat(run.id, step=trainer.progress.global_step, epoch=trainer.progress.epoch)
        store.set_status(run.id, status)
        _log(f"run {run.name} {status}")
        return 0
    except BaseException as exc:
        tb = traceback.format_exc()
        _log(tb)
        try:
            sink.close()
        except Exception:  # the failure being recorded matters more than the last metrics
            pass
        store.set_status(run.id, "failed", error=f"{type(exc).__name__}: {exc}\n\n{tb}")
        return 1
    finally:
        beat_stop.set()
        if monitor is not None:
            monitor.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nlmm.train.worker")
    parser.add_argument("run_id", type=int)
    args = parser.parse_args(argv)
    sys.exit(run_worker(args.run_id))


if __name__ == "__main__":
    main()
