"""The training loop: cached batches → NL-MM → level optimizer, with evaluation and checkpoints.

Everything that touches processes, signals or the store's run status lives in `worker.py`;
this module only needs a metric sink and a stop flag, so tests can drive it in-process. Under
torchrun the same loop runs on every rank (see `distributed.py`); only rank 0 checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from nlmm.config import MODALITIES, Config
from nlmm.data.cache import PreparedCache
from nlmm.data.loader import PREFETCH_DEPTH, TrainLoader
from nlmm.data.pack_source import PackedSource
from nlmm.model.cms import level_gain_means
from nlmm.errors import NlmmError
from nlmm.metric_names import LOSS_KEYS
from nlmm.model import NLMM
from nlmm.model.losses import ContrastiveLoss
from nlmm.inference.checkpoint import model_snapshot, save_checkpoint
from nlmm.train.distributed import (
    SINGLE,
    DistContext,
    any_rank,
    check_batch_size,
    evaluate_split_sharded,
    shard_batch,
    sync_context,
    wrap_model,
)
from nlmm.eval.evaluate import evaluate_packed, evaluate_split
from nlmm.units import file_size, hms
from nlmm.train.speed import (
    NOT_COMPILE_FAILURES,
    CompiledParts,
    channels_last_images,
    compile_encoders,
    tf32_scope,
    use_channels_last,
)

# A modality whose batch embeddings keep a mean pairwise cosine above this for a whole epoch
# has collapsed: every item maps to (nearly) the same point and retrieval is at chance.
COLLAPSE_SPREAD = 0.98
# Steps skipped in a row for a non-finite loss or gradient before the run is failed: isolated
# overflows happen (and fp16 loss-scale calibration skips a few at the start), a streak is a
# diverged model that would otherwise loop on the same step forever.
MAX_SKIPPED_IN_A_ROW = 25


def embedding_spread(emb: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine of L2-normalised (N, E) embeddings, the diagonal left out:
    about 0 for well-spread embeddings, 1 for a collapsed modality."""
    n = emb.shape[0]
    total = emb.float().sum(dim=0)
    return ((total @ total) - n) / max(n * n - n, 1)


class MetricSink(Protocol):
    def log(self, step: int, epoch: int, values: dict[str, float]) -> None: ...


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues exactly."""
    global_step: int = 0
    epoch: int = 0  # 0-based epoch being trained
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_metric: float = -1.0
    last_eval: dict[str, float] = field(default_factory=dict)

    @property
    def epoch_number(self) -> int:
        """The 1-based epoch the latest step belongs to (0 before the first): the one number
        a person reads in train.log, the store, `runs ls` and the dash."""
        return self.epoch + (1 if self.batch_in_epoch else 0)


@dataclass
class CheckpointEvent:
    path: Path
    kind: str  # last | best | epoch
    progress: Progress
    metrics: dict[str, float]
    nbytes: int


class StreamedBatches:
    """A pack's per-rank loader with its CPU batches moved to the training device."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                   for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()


# Test hook: with this variable set to a file, every training step appends "step rank ids" (the
# caption ids of its batches), so a test can check that a resumed run saw the same samples.
SAMPLE_TRACE = "NLMM_SAMPLE_TRACE"


def trace_samples(path: str, step: int, rank: int, batches: list[dict[str, torch.Tensor]]) -> None:
    ids = [int(i) for b in batches for i in b["caption_ids"].tolist()]
    with open(path, "a") as fh:
        fh.write(f"{step} {rank} {' '.join(map(str, ids))}\n")


# A CMS level whose update per step stays under this share of the fastest level's, after
# STILL_AFTER of its own updates, is reported as barely moving.
STILL_LEVEL = 0.01
STILL_AFTER = 8


def still_levels(ratios: dict[str, float], chunks: dict[str, int],
                 updates: dict[str, int]) -> list[str]:
    """The levels whose relative update per step (ratio / chunk_size: a chunk's update covers
    C steps) stays under STILL_LEVEL of the fastest level's, once they have had STILL_AFTER
    updates."""
    fastest = min(chunks, key=chunks.get)
    if fastest not in ratios or ratios[fastest] <= 0:
        return []
    base = ratios[fastest] / chunks[fastest]
    return [name for name, ratio in ratios.items() if name != fastest and name in chunks
            and updates.get(name, 0) >= STILL_AFTER and ratio / chunks[name] < STILL_LEVEL * base]


# A run cut short by --steps keeps its warmup within this share of its steps.
SHORT_RUN_WARMUP = 0.1


def short_run_warmup(warmup: int, total: int, planned: int) -> int:
    """The warmup of a run of `total` steps out of `planned`: `--steps` makes a short run whose
    warmup and cosine both fit it (a cap that ended inside the warmup would train at a sliver of
    the lr and look as if the recipe did not learn), so a cap shortens the warmup to at most
    SHORT_RUN_WARMUP of the run; an uncapped run keeps its configured warmup."""
    if total >= planned:
        return warmup
    return min(warmup, max(1, int(SHORT_RUN_WARMUP * total)))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total` (or constant)."""
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * done))


class Trainer:
    """Owns the model, level optimizer and data of one run (of one rank, under torchrun).

    `cfg.train.batch_size` is the global batch: with `dist.world_size` ranks each trains on its
    slice of every batch. Sink and log should be no-ops on ranks other than 0.
    """

    def __init__(self, cfg: Config, cache: PreparedCache, device: torch.device, run_dir: Path,
                 sink: MetricSink, on_checkpoint: Callable[[CheckpointEvent], None] | None = None,
                 stop_event: threading.Event | None = None, log: Callable[[str], None] = print,
                 dist: DistContext = SINGLE, compile_backend: str = "inductor"):
        """`compile_backend`: the torch.compile backend of `train.compile` (tests and CPU smoke
        runs pass a cheaper one than inductor).

        Construction reads and downloads nothing: the caller builds the frozen backbones' feature
        cache first (`nlmm.data.backbone_features.ensure_features`, else the backbones run at
        every step) and loads their pretrained weights afterwards
        (`trainer.model.load_pretrained_backbones()`, before any checkpoint is loaded)."""
        self.cfg, self.cache, self.device, self.run_dir = cfg, cache, device, Path(run_dir)
        # a pack streams each rank its own batches; a prepared cache serves the global batch
        self.streamed = isinstance(cache, PackedSource)
        self.active_loader: Any = None
        self.saved_loader_state: dict[str, Any] | None = None
        self.still_warned: set[str] = set()
        self.sink, self.on_checkpoint, self.log = sink, on_checkpoint, log
        self.stop_event = stop_event or threading.Event()
        self.dist = dist
        check_batch_size(cfg.train.batch_size, dist)
        torch.manual_seed(cfg.train.seed)
        self.model = NLMM(cfg).to(device)
        self.channels_last = cfg.train.channels_last and use_channels_last(self.model, device)
        self.optimizer = self.model.configure_optimizers(cfg)
        self.loss = ContrastiveLoss.from_config(cfg, gather=dist.enabled)
        # with the batch counter: a step that is skipped or redone did not see its batch
        self.norm_stats = [t for m in self.model.modules()
                           if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                           for t in (m.running_mean, m.running_var, m.num_batches_tracked)
                           if t is not None]
        self.ddp = wrap_model(self.model, device, dist)
        self.compiled: CompiledParts | None = None
        if cfg.train.compile:
            self.log("compiling the encoders with torch.compile: the first steps take longer")
            self.compiled = compile_encoders(self.model, self.log, compile_backend)
        self.progress = Progress()
        # what the run is doing, for the heartbeat: a bar at 100 % for a minute says nothing
        self.phase = "training"
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.epoch_min_spread: dict[str, float] = {}
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_step = -1
        self.saved_at = time.perf_counter()  # when a checkpoint was last written (or training began)
        self.batches_per_epoch = len(self.loader(0))
        self.steps_per_epoch = self.batches_per_epoch // cfg.train.accumulate
        if self.steps_per_epoch == 0:
            raise ValueError(f"the train split has fewer than batch_size x accumulate = "
                             f"{cfg.train.batch_size * cfg.train.accumulate} examples; lower "
                             "--batch-size or --accumulate")
        self.total_steps, self.warmup_steps = self._schedule(cfg)

    def _schedule(self, cfg: Config) -> tuple[int, int]:
        """(total steps, warmup steps) of `cfg`'s epochs and train_steps cap."""
        planned = cfg.train.epochs * self.steps_per_epoch
        total = min(planned, cfg.train_steps) if cfg.train_steps else planned
        return total, short_run_warmup(cfg.train.warmup_steps, total, planned)

    def replan(self, cfg: Config) -> None:
        """Train to `cfg`'s epochs and train_steps instead (a resume asked for more steps or
        epochs): the lr schedule becomes the one a run planned that way from the start has, its
        cosine stretched to the new end, except that the warmup never grows (a run past its
        warmup would otherwise fall back into it)."""
        had = self.warmup_steps
        self.cfg = cfg
        self.total_steps, warmup = self._schedule(cfg)
        self.warmup_steps = min(warmup, had)

    # ------------------------------------------------------------------ state

    def loader(self, epoch: int, start_batch: int = 0) -> Any:
        """The shuffled training batches of `epoch` (0-based), from batch `start_batch` on (a
        pack's loader resumes from the state saved in last.pt when there is one)."""
        cfg = self.cfg
        if self.streamed:
            return self._stream_loader(epoch, start_batch)
        max_frames = cfg.data.mel_frames(cfg.data.max_audio_samples)
        return TrainLoader(self.cache, "train", cfg.train.batch_size, seed=cfg.train.seed,
                           epoch=epoch, shuffle=True, drop_last=True, device=self.device,
                           crop=cfg.data.augment.crop, flip=cfg.data.augment.flip,
                           max_audio_frames=max_frames,
                           start_batch=start_batch,
                           prefetch_depth=cfg.train.prefetch_batches or PREFETCH_DEPTH,
                           modalities=tuple(cfg.modalities))

    def _stream_loader(self, epoch: int, start_batch: int) -> StreamedBatches:
        from nlmm.data.stream import StreamTrainLoader

        cfg, state = self.cfg, self.saved_loader_state
        # the saved state counts global steps: it resumes on any number of ranks and workers
        resume = state is not None and state.get("epoch") == epoch and start_batch > 0
        loader = StreamTrainLoader(
            self.cache.path, "train", batch_size=cfg.train.batch_size // self.dist.world_size,
            seed=cfg.train.seed, epoch=epoch, data_cfg=cfg.data, tokenizer=self.cache.tokenizer,
            rank=self.dist.rank, world_size=self.dist.world_size,
            num_workers=cfg.train.loader_workers or 2, samples_per_epoch=cfg.train.samples_per_epoch,
            crop=cfg.data.augment.crop, flip=cfg.data.augment.flip,
            start_batch=0 if resume else start_batch)
        if resume:
            loader.load_state_dict(state)
            self.saved_loader_state = None
        return StreamedBatches(loader, self.device)

    def state_dict(self) -> dict[str, Any]:
        p = self.progress
        # "scheduler": the key checkpoints have always stored the level optimizer under
        return {"model": self.model.state_dict(), "scheduler": self.optimizer.state_dict(),
                "progress": {"global_step": p.global_step, "epoch": p.epoch,
                             "batch_in_epoch": p.batch_in_epoch, "best_metric": p.best_metric,
                             "last_eval": p.last_eval},
                "config": self.cfg.to_dict(), "tokenizer": self.cache.tokenizer.to_json(),
                "data": {"cache": str(self.cache.path), "key": self.cache.key,
                         "params": self.cache.manifest.get("params", {})},
                "rng": torch.get_rng_state(),
                # where a streaming loader is in its epoch: a resume serves the same samples
                **({"loader": self.active_loader.state_dict()}
                   if self.streamed and self.active_loader is not None else {})}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["scheduler"])
        self.progress = Progress(**payload["progress"])
        torch.set_rng_state(payload["rng"])
        self.saved_loader_state = payload.get("loader")

    def checkpoint(self, kind: str, metrics: dict[str, float] | None = None) -> CheckpointEvent | None:
        """Save the state as `kind` (rank 0 only; other ranks return None): the full training
        state in last.pt, a model snapshot in best.pt and the epoch files."""
        if not self.dist.is_main:
            return None
        name = {"last": "last.pt", "best": "best.pt"}.get(kind, f"epoch_{self.progress.epoch:03d}.pt")
        path = self.run_dir / "checkpoints" / name
        phase, self.phase = self.phase, f"saving {name}"
        started = time.perf_counter()
        payload = self.state_dict() if kind == "last" else model_snapshot(self.state_dict())
        payload["metrics"] = metrics or {}
        nbytes = save_checkpoint(path, payload)
        self.saved_at = time.perf_counter()
        self.phase = phase
        self.log(f"saved {name} ({file_size(nbytes)}) in {self.saved_at - started:.1f} s")
        event = CheckpointEvent(path, kind, Progress(**vars(self.progress)), metrics or {}, nbytes)
        if self.on_checkpoint:
            self.on_checkpoint(event)
        return event

    # ------------------------------------------------------------------ steps

    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.cfg.precision.amp
        if self.device.type != "cuda" or amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of the (global) batch, plus `spread/<modality>` of this rank's embeddings."""
        if self.channels_last:
            batch = channels_last_images(batch)
        if self.ddp is None:
            outputs, _ = self.model(batch)
        else:
            outputs, _ = self.ddp(batch if self.streamed else shard_batch(batch, self.dist))
        losses = self.loss(outputs)
        with torch.no_grad():
            for modality in MODALITIES:
                emb = outputs.embeddings.get(modality)
                if emb is not None and emb.shape[0] > 1:
                    losses[f"spread/{modality}"] = embedding_spread(emb.detach())
        return losses

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulate` micro-batches; returns detached losses."""
        if SAMPLE_TRACE in os.environ:
            trace_samples(os.environ[SAMPLE_TRACE], self.progress.global_step + 1, self.dist.rank,
                          batches)
        self.model.train()
        # a batch that turns the loss non-finite also writes NaN into BatchNorm's running
        # statistics, which would poison every later evaluation: kept to put back on a skip
        saved_stats = [t.clone() for t in self.norm_stats]
        try:
            totals = self._gradients(batches)
        except NOT_COMPILE_FAILURES:
            raise
        except Exception as exc:
            if self.compiled is None or not self.compiled.active:
                raise
            # a compiled part's backward is compiled at its first use, inside backward(): on a
            # failure there the step starts again, eagerly, from where it began
            self.compiled.fall_back(exc)
            self.optimizer.zero_grad()
            if self.norm_stats:
                torch._foreach_copy_(self.norm_stats, saved_stats)
            totals = self._gradients(batches)
        step = self.progress.global_step + 1
        self.optimizer.set_lr_factor(lr_factor(step, self.total_steps,
                                               self.warmup_steps, self.cfg.train.schedule))
        self.optimizer.step_all(step)
        if self.optimizer.last_step_skipped:
            if self.norm_stats:
                torch._foreach_copy_(self.norm_stats, saved_stats)
            # a non-finite loss or gradient (or an fp16 overflow) retries the same step number,
            # so slow levels keep their rhythm
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                # counted as the store counts (steps done), so it agrees with "step N/M"
                raise NlmmError(f"training diverged: {self.skipped_in_a_row} steps in a row had a "
                                f"non-finite loss or gradient after step {step - 1}, where the "
                                f"run stopped; lower the learning rate (--lr) or raise "
                                f"train.warmup_steps and start again.")
        else:
            self.skipped_in_a_row = 0
            self.progress.global_step = step
        return totals

    def _gradients(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Forward and backward of every micro-batch; returns their mean losses, on the device
        (read once per log window: a read per step would stall the GPU queue)."""
        totals: dict[str, torch.Tensor] = {}
        n = len(batches)
        amp = self.cfg.precision.amp
        for i, batch in enumerate(batches):
            with sync_context(self.ddp, last_micro_batch=i == n - 1), \
                    tf32_scope(self.device, amp, self.cfg.precision.tf32):
                with self._autocast():
                    outputs = self._forward(batch)
                self.optimizer.scale_loss(outputs["loss"] / n).backward()
            for key in LOSS_KEYS + ("temperature",) + tuple(f"spread/{m}" for m in MODALITIES):
                if key in outputs:
                    value = outputs[key].detach().float() / n
                    totals[key] = totals[key] + value if key in totals else value
        return totals

    def _progress_line(self, values: dict[str, float], s_per_step: float) -> str:
        """One plain line per log window, for train.log and a terminal that is not a TTY."""
        p = self.progress
        pairs = " ".join(f"{k[5:]} {values[k]:.3f}" for k in LOSS_KEYS[1:] if k in values)
        eta = hms(max(0, self.total_steps - p.global_step) * s_per_step)
        return (f"step {p.global_step}/{self.total_steps} · epoch {p.epoch_number}/"
                f"{self.cfg.train.epochs} · loss {values.get('loss', float('nan')):.3f} ({pairs}) · "
                f"{values['triples_per_s']:.3g} triples/s · ETA {eta}")

    def evaluate(self, split: str) -> dict[str, float]:
        """Recall@K on `split`: embedded under the training autocast, scored in fp32 (the
        scoring turns autocast off), so the figures equal `nlmm eval` on the same weights."""
        # Plain embeddings even with ttt.enable: TTT costs max_steps forward+backward passes per
        # item, too much for every epoch; `nlmm eval` reports the TTT figures beside these.
        with self._autocast():
            if self.streamed:  # every rank scores the whole split: the same figures on each
                return evaluate_packed(self.model, self.cache.path, split, self.device,
                                       self.cfg.data, self.cache.tokenizer)
            if self.dist.enabled:
                return evaluate_split_sharded(self.model, self.cache, split, self.device, self.dist)
            return evaluate_split(self.model, self.cache, split, self.device)

    def _level_metrics(self) -> dict[str, float]:
        """`level/<name>/update_ratio` (‖Δθ‖/‖θ‖ of the level's last applied update) and
        `level/<name>/gain` (mean |LayerScale gain|) of every CMS level; a level whose per-step
        update stays under STILL_LEVEL of the fastest level's is warned about once."""
        ratios = self.optimizer.update_ratios()
        values = {f"level/{k}/update_ratio": v for k, v in ratios.items()}
        values.update({f"level/{k}/gain": v for k, v in level_gain_means(self.model).items()})
        chunks = {lvl.name: lvl.chunk_size for lvl in self.cfg.cms_levels}
        # a level is due when global_step ≡ 0 (mod C): this many updates so far
        updates = {name: self.progress.global_step // c for name, c in chunks.items()}
        for name in still_levels(ratios, chunks, updates):
            if name not in self.still_warned:
                self.still_warned.add(name)
                values[f"level/{name}/still"] = 1.0
                self.log(f"warning: CMS level {name} barely moves: after "
                         f"{updates[name]} updates its per-step "
                         f"update is under {STILL_LEVEL:g} of the fastest level's, so it adds "
                         f"next to nothing; raise its lr or lower its chunk_size.")
        return values

    def _watch_spread(self, values: dict[str, float]) -> None:
        """Track each modality's lowest window spread of the epoch (see _warn_collapse)."""
        for modality in MODALITIES:
            spread = values.get(f"spread/{modality}")
            if spread is not None:
                low = self.epoch_min_spread.get(modality, math.inf)
                self.epoch_min_spread[modality] = min(low, spread)

    def _warn_collapse(self) -> None:
        """At an epoch's end: a warning line for every modality whose spread stayed above
        COLLAPSE_SPREAD in every logged window of the epoch, and a `collapsed/<modality>` flag."""
        flags = {}
        for modality, low in self.epoch_min_spread.items():
            collapsed = low > COLLAPSE_SPREAD
            flags[f"collapsed/{modality}"] = float(collapsed)
            if collapsed:
                self.log(f"warning: the {modality} embeddings collapsed in epoch {self.progress.epoch_number}: "
                         f"their mean pairwise cosine stayed above {COLLAPSE_SPREAD} (lowest "
                         f"{low:.3f}), so {modality} retrieval is at chance; lower the learning "
                         f"rate or check the {modality} data.")
        if flags:
            self.sink.log(self.progress.global_step, self.progress.epoch_number, flags)
        self.epoch_min_spread = {}

    def _stop_requested(self) -> bool:
        # all ranks must leave the loop at the same step, wherever the signal arrived
        return any_rank(self.stop_event.is_set(), self.dist, self.device)

    def fit(self) -> str:
        """Train until the planned steps are done or a stop is requested; returns
        "finished" or "stopped". The last checkpoint is always written before returning."""
        cfg, p = self.cfg, self.progress
        acc = cfg.train.accumulate
        log_every = cfg.train.log_every
        window: dict[str, torch.Tensor] = {}
        # throughput counts training time only: evaluation and checkpoints reset the tick
        window_steps, window_skipped, window_time, tick = 0, 0, 0.0, time.perf_counter()
        while p.global_step < self.total_steps and p.epoch < cfg.train.epochs:
            loader = self.active_loader = self.loader(p.epoch, start_batch=p.batch_in_epoch)
            pending: list[dict[str, torch.Tensor]] = []
            for batch in loader:
                pending.append(batch)
                if len(pending) < acc:
                    continue
                losses = self.train_step(pending)
                now = time.perf_counter()
                window_time, tick = window_time + now - tick, now
                p.batch_in_epoch += len(pending)
                pending = []
                if self.optimizer.last_step_skipped:
                    window_skipped += 1  # its losses are not finite: kept out of the means
                else:
                    for key, value in losses.items():
                        window[key] = window[key] + value if key in window else value
                    window_steps += 1
                    if p.global_step % log_every == 0 or p.global_step == self.total_steps:
                        # one read of the whole window (a float() per key is a sync per key)
                        means = (torch.stack(list(window.values())) / window_steps).tolist()
                        values = dict(zip(window, means))
                        values["skipped_steps"] = float(window_skipped)
                        values["triples_per_s"] = ((window_steps + window_skipped) * acc
                                                   * cfg.train.batch_size / max(window_time, 1e-9))
                        values.update({f"lr/{k}": v for k, v in self.optimizer.lrs().items()})
                        values.update(self._level_metrics())
                        self.sink.log(p.global_step, p.epoch_number, values)
                        self.log(self._progress_line(
                            values, window_time / (window_steps + window_skipped)))
                        self._watch_spread(values)
                        window, window_steps, window_skipped, window_time = {}, 0, 0, 0.0
                if self._stop_requested():
                    self.checkpoint("last")
                    return "stopped"
                if cfg.train.checkpoint_minutes and \
                        time.perf_counter() - self.saved_at >= 60 * cfg.train.checkpoint_minutes:
                    # an epoch on a large corpus can take hours: a crash loses minutes, not it
                    self.checkpoint("last", p.last_eval)
                    tick = time.perf_counter()
                if p.global_step >= self.total_steps:
                    break
            if p.global_step >= self.total_steps:
                # Eq. 31: a level's open chunk is part of what the run learned; applied before
                # the final evaluation, last.pt (which still resumes exactly) and the test
                self.optimizer.flush()
            epoch_done = p.batch_in_epoch >= self.steps_per_epoch * acc
            if epoch_done:
                self._warn_collapse()
                p.epoch += 1
                p.batch_in_epoch = 0
            if epoch_done and (p.epoch % cfg.train.eval_every == 0 or p.global_step >= self.total_steps):
                self._evaluate_and_keep()
            elif p.global_step >= self.total_steps:
                self._evaluate_and_keep()
            if cfg.train.checkpoint_every and epoch_done and p.epoch % cfg.train.checkpoint_every == 0:
                self.checkpoint("epoch", p.last_eval)
            self.checkpoint("last", p.last_eval)
            tick = time.perf_counter()
            if self._stop_requested():
                return "stopped"
        self._test_best_and_last()
        return "finished"

    def _evaluate_and_keep(self) -> None:
        p = self.progress
        split = self.cfg.train.eval_split
        self.phase = f"evaluating {split}"
        self.log(f"evaluating {split} at step {p.global_step} (epoch {p.epoch_number})")
        metrics = self.evaluate(split)
        self.phase = "training"
        p.last_eval = metrics
        self.sink.log(p.global_step, p.epoch_number, metrics)
        self.log(f"{split} epoch {p.epoch_number} step {p.global_step} " +
                 " ".join(f"{k}={v:.1f}" for k, v in metrics.items() if k.endswith("_r1")))
        # a model with non-finite weights scores 0 (non-finite scores are misses), but it must
        # not replace a good best.pt even on a tie at 0
        finite = all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values()
                     if t.is_floating_point())
        if finite and metrics.get("mean_r1", -1.0) > p.best_metric:
            p.best_metric = metrics["mean_r1"]
            self.checkpoint("best", metrics)
            self.best_weights = {k: v.detach().to("cpu", copy=True)
                                 for k, v in self.model.state_dict().items()}
            self.best_step = p.global_step

    def _test_best_and_last(self) -> None:
        """Test the dev-selected best model as `test/…` (what `nlmm eval RUN` scores, from
        best.pt) and the last model as `test_last/…`. The model is left holding the best weights."""
        p = self.progress
        self.phase = "testing"
        self.log("testing the last and the best dev model on the test split")
        last = self.evaluate("test")
        self.sink.log(p.global_step, p.epoch_number, {f"test_last/{k}": v for k, v in last.items()})
        best = self.best_weights
        path = self.run_dir / "checkpoints" / "best.pt"
        if best is None and path.is_file():  # resumed: the best model is only on disk
            from nlmm.inference.checkpoint import load_checkpoint
            best = load_checkpoint(path)["model"]
        if best is None or self.best_step == p.global_step:
            test = last
        else:
            self.model.load_state_dict(best)
            test = self.evaluate("test")
        self.sink.log(p.global_step, p.epoch_number, {f"test/{k}": v for k, v in test.items()})
        self.log("test (best dev checkpoint) " +
                 " ".join(f"{k}={v:.1f}" for k, v in test.items() if k.endswith("_r1")))
