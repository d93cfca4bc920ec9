"""Training throughput: seconds per epoch, triples/s, model FLOP utilisation, peak memory, the
store's share of step time, host syncs per step, and cached backbone features.

Writes a synthetic corpus in the Flickr8k + FACC layout (or reuses `--corpus`), prepares it, and
trains with the real loop (`Trainer.fit`) and the real store (a SQLite file in a temp folder,
`MetricWriter` wrapped in a timer).

Two ways of timing:
  whole epochs (default)  `--epochs` epochs; evaluation and checkpoint writing are timed apart
                          and left out of the epoch time.
  `--steps N`             `--warmup` steps first (compilation, allocator and cuDNN warm-up),
                          then N timed steps (data loading, logging and the store included);
                          seconds per epoch = the epoch's steps x the measured seconds per step.
                          Then `--sync-steps` more steps count the host syncs of a step (CUDA:
                          torch's sync debug mode; CPU: tensor reads, see nlmm.train.speed).
                          Evaluation and checkpoints are skipped: this mode measures training.

MFU: model FLOPs per triple (nlmm.model.info, at the train split's mean caption and clip
lengths; a checkpointed forward's recomputation is not counted) x triples/s over the GPU's
dense bf16 peak (bench/gpu_info.py; unknown GPU or CPU: no MFU). Baseline mode only: the FLOP
count does not cover pretrained backbones.

Modes, all with the config's NL-MM layers (`--config`):
  baseline  the config as written (patch / log-mel stems)
  cached    frozen backbones, features read from the cache `nlmm data prepare` built
  frozen    the same frozen backbones run on pixels / waveforms at every step (no feature cache)
  e2e       the backbones trained end to end (`frozen: false`)
Backbone weights are random, written to files here (no download): resnet18 + wav2vec2_tiny on
the CPU, resnet50 + HUBERT_BASE on a GPU, unless --image-backbone / --audio-backbone say other.

    .venv/bin/python bench/train_bench.py                      # tiny_cpu on the CPU
    .venv/bin/python bench/train_bench.py --images 8000 --config flickr8k --modes baseline \\
        --steps 30 --json out.json                             # one GPU (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_info import (describe_device, mean_triple, model_flop_utilisation, peak_memory,
                      reset_peak_memory)

from nlmm.backbones import BackboneSpec, build_full_network
from nlmm.config import AUDIO_BACKBONES, IMAGE_BACKBONES, Config, resolve_config
from nlmm.data.cache import PreparedCache, prepare
from nlmm.data.synth import synth_corpus
from nlmm.devices import resolve_device
from nlmm.model.info import model_info
from nlmm.train.loop import Trainer
from nlmm.train.speed import count_syncs

MODES = ("baseline", "cached", "frozen", "e2e")


class TimedWriter:
    """A metric sink that times every call into the store's MetricWriter."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.seconds = 0.0
        self.calls = 0

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        start = time.perf_counter()
        self.writer.log(step, epoch, values)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def close(self) -> None:
        start = time.perf_counter()
        self.writer.close()
        self.seconds += time.perf_counter() - start


def timed(fn: Any, totals: dict[str, float], key: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepPlan:
    warmup: int
    steps: int
    sync_steps: int

    @property
    def total(self) -> int:
        return self.warmup + self.steps + self.sync_steps


class StepClock:
    """Stands in for `Trainer.train_step`: times the steps after the warm-up (from the start of
    the first timed step to the start of the first step after them, the device drained at both
    ends), then counts the host syncs of each remaining step."""

    def __init__(self, trainer: Trainer, sink: TimedWriter, plan: StepPlan) -> None:
        self.step, self.device = trainer.train_step, trainer.device
        self.sink, self.plan = sink, plan
        self.calls = 0
        self.began = time.perf_counter()
        self.start: float | None = None
        self.end: float | None = None
        self.store_seconds = 0.0
        self.syncs: list[list[str]] = []
        trainer.train_step = self

    def _mark_end(self) -> None:
        if self.start is not None and self.end is None:
            synchronize(self.device)
            self.end = time.perf_counter()
            self.store_seconds += self.sink.seconds

    def __call__(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.plan.warmup + 1:
            synchronize(self.device)
            self.start = time.perf_counter()
            self.store_seconds = -self.sink.seconds
        if self.calls <= self.plan.warmup + self.plan.steps:
            return self.step(batches)
        self._mark_end()
        out: list[dict[str, torch.Tensor]] = []
        self.syncs.append(count_syncs(lambda: out.append(self.step(batches)), self.device))
        return out[0]

    def finish(self) -> dict[str, Any]:
        self._mark_end()
        if self.start is None or self.end is None or self.calls < self.plan.warmup + self.plan.steps:
            raise SystemExit(f"only {self.calls} steps ran, fewer than --warmup + --steps = "
                             f"{self.plan.warmup + self.plan.steps}; use a larger corpus or "
                             f"fewer steps")
        sites = collections.Counter(site for step in self.syncs for site in step)
        return {"warmup_s": self.start - self.began, "timed_s": self.end - self.start,
                "store_s": self.store_seconds,
                "syncs_per_step": (sum(map(len, self.syncs)) / len(self.syncs)
                                   if self.syncs else None),
                "sync_sites": {site: n / len(self.syncs) for site, n in sites.most_common(12)}}


def train_once(label: str, cfg: Config, cache: PreparedCache, device: torch.device,
               folder: Path, plan: StepPlan | None = None,
               compile_backend: str = "inductor") -> dict[str, Any]:
    """Fit `cfg` on `cache` and measure it (see the module docstring)."""
    from nlmm import store

    run = store.create_run(label, cfg.to_dict(), str(cache.path), str(device),
                           epochs_total=cfg.train.epochs, steps_total=None)
    sink = TimedWriter(store.MetricWriter(run.id))
    messages: list[str] = []
    # `cache` is already the one the mode asks for: "frozen" trains on pixels / waveforms
    trainer = Trainer(cfg, cache, device, folder / label, sink, log=messages.append,
                      compile_backend=compile_backend)
    trainer.model.load_pretrained_backbones(progress=False)
    aside: dict[str, float] = {}
    clock = None
    if plan is None:
        trainer.evaluate = timed(trainer.evaluate, aside, "evaluate")
        trainer.checkpoint = timed(trainer.checkpoint, aside, "checkpoint")
    else:
        trainer._evaluate_and_keep = lambda: None
        trainer._test_best_and_last = lambda: None
        trainer.checkpoint = lambda *args, **kwargs: None
        clock = StepClock(trainer, sink, plan)
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    trainer.fit()
    timing = clock.finish() if clock is not None else None
    sink.close()
    synchronize(device)
    batch = cfg.train.accumulate * cfg.train.batch_size
    if timing is None:
        train_s = time.perf_counter() - start - sum(aside.values())
        epoch_s = train_s / max(trainer.progress.epoch, 1)
        triples_per_s = trainer.progress.global_step * batch / train_s
        store_share = sink.seconds / train_s
        timing = {"timed_s": train_s}
    else:
        step_s = timing["timed_s"] / plan.steps
        epoch_s = step_s * trainer.steps_per_epoch
        triples_per_s = batch / step_s
        store_share = timing["store_s"] / timing["timed_s"]
    warnings = [m for m in messages if m.startswith("warning")]
    for message in warnings:
        print(f"  [{label}] {message}")
    return {"epoch_s": epoch_s, "triples_per_s": triples_per_s, "store_share": store_share,
            "store_calls": sink.calls, "eval_s": aside.get("evaluate", 0.0),
            "steps": trainer.progress.global_step, "steps_per_epoch": trainer.steps_per_epoch,
            "batch_size": cfg.train.batch_size, "peak_memory": peak_memory(device),
            "compile": cfg.train.compile, "grad_checkpointing": cfg.train.grad_checkpointing,
            "compile_fallback": trainer.compiled.failure if trainer.compiled else None,
            "warnings": warnings, **timing}


def weight_files(folder: Path, image: str, audio: str) -> dict[str, Path]:
    """Random weights of both backbones written as state-dict files (what `weights:` reads)."""
    files = {}
    for modality, name, layers in (("image", image, IMAGE_BACKBONES[image]),
                                   ("audio", audio, AUDIO_BACKBONES[audio])):
        spec = BackboneSpec(modality, name, "file", layers, True, 0.1)
        files[modality] = folder / f"{name}.pt"
        torch.save(build_full_network(spec).state_dict(), files[modality])
    return files


def backbone_overrides(files: dict[str, Path], image: str, audio: str, frozen: bool) -> list[str]:
    return [f"encoders.image.backbone={image}", f"encoders.image.weights={files['image']}",
            f"encoders.image.frozen={str(frozen).lower()}",
            f"encoders.audio.backbone={audio}", f"encoders.audio.weights={files['audio']}",
            f"encoders.audio.frozen={str(frozen).lower()}", "data.sample_rate=16000"]


def corpus_root(args: argparse.Namespace, folder: Path) -> Path:
    """`--corpus` (written there first when it holds none) or a corpus in the temp folder."""
    root = Path(args.corpus) if args.corpus else folder / "corpus"
    if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
        synth_corpus(root, n_images=args.images, seed=0, engine="builtin", progress=False,
                     overwrite=True)
    return root


def add_flops(result: dict[str, Any], cfg: Config, cache: PreparedCache,
              device_info: dict[str, Any]) -> None:
    """Model FLOPs per triple at the corpus's mean lengths, and the MFU they give."""
    sizes = mean_triple(cache, cfg.data.max_audio_seconds)
    flops = model_info(cfg, batch_size=cfg.train.batch_size, **sizes)["flops_per_triple"]["total"]
    result.update(flops_per_triple=flops, mean_triple=sizes,
                  mfu=model_flop_utilisation(flops, result["triples_per_s"],
                                             device_info["peak_bf16_tflops"]))


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"{'mode':<10}{'s/epoch':>10}{'triples/s':>12}{'MFU':>8}{'peak GiB':>10}"
          f"{'store':>9}{'syncs/step':>12}{'eval s':>8}")
    for mode, r in results.items():
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        syncs = "-" if r.get("syncs_per_step") is None else f"{r['syncs_per_step']:.1f}"
        print(f"{mode:<10}{r['epoch_s']:>10.2f}{r['triples_per_s']:>12.1f}{mfu:>8}"
              f"{r['peak_memory']['bytes'] / 2**30:>10.2f}{100 * r['store_share']:>8.2f}%"
              f"{syncs:>12}{r['eval_s']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240, help="synthetic corpus size")
    parser.add_argument("--corpus", default=None,
                        help="corpus folder to reuse (written there with --images when empty)")
    parser.add_argument("--config", default="tiny_cpu", help="config name or YAML path")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None,
                        help="time this many steps after --warmup instead of whole epochs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sync-steps", type=int, default=3,
                        help="with --steps: steps whose host syncs are counted afterwards")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument("--image-backbone", default=None)
    parser.add_argument("--audio-backbone", default=None)
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="train.grad_checkpointing=true")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend when train.compile is set")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--label", default=None, help="name of this measurement in --json")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        sys.exit(f"unknown mode {unknown[0]!r}; pick from {', '.join(MODES)}")
    plan = StepPlan(args.warmup, args.steps, args.sync_steps) if args.steps else None

    device = resolve_device(args.device)
    device_info = describe_device(device)
    on_gpu = device.type == "cuda"
    image = args.image_backbone or ("resnet50" if on_gpu else "resnet18")
    audio = args.audio_backbone or ("HUBERT_BASE" if on_gpu else "wav2vec2_tiny")
    with tempfile.TemporaryDirectory(prefix="nlmm-train-bench-") as tmp:
        folder = Path(tmp)
        os.environ["NLMM_RUNS_DIR"] = str(folder / "runs")
        start = time.perf_counter()
        root = corpus_root(args, folder)
        overrides = [f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", *args.set]
        if args.grad_checkpointing:
            overrides.append("train.grad_checkpointing=true")
        if plan is not None:
            # enough epochs for the planned steps; train_steps ends the run right after them
            overrides += ["train.epochs=1000", f"train_steps={plan.total}"]
        cfg = resolve_config(args.config, overrides)
        cache = prepare(root, cfg.data, cfg.vocab_size, progress=False)
        print(f"corpus: {cache.n_images} synthetic images, {cache.n_captions} captions; written "
              f"and prepared in {time.perf_counter() - start:.1f} s; device {device}"
              f"{' (' + device_info['name'] + ')' if on_gpu else ''}, "
              f"torch threads {torch.get_num_threads()}")
        print(f"config {args.config}: d_model {cfg.d_model}, depth {vars(cfg.depth)}, batch "
              f"{cfg.train.batch_size}, image {cfg.data.image_size} px, amp {cfg.precision.amp}, "
              f"compile {cfg.train.compile}, grad checkpointing {cfg.train.grad_checkpointing}, "
              + (f"{plan.steps} timed steps after {plan.warmup}" if plan else
                 f"{args.epochs} epoch(s)"))
        results: dict[str, dict[str, Any]] = {}
        if "baseline" in modes:
            results["baseline"] = train_once("baseline", cfg, cache, device, folder, plan,
                                             args.compile_backend)
            add_flops(results["baseline"], cfg, cache, device_info)
        backbone_modes = [m for m in modes if m != "baseline"]
        if backbone_modes:
            files = weight_files(folder, image, audio)
            frozen = resolve_config(args.config, overrides + backbone_overrides(files, image, audio, True))
            unfrozen = resolve_config(args.config, overrides + backbone_overrides(files, image, audio, False))
            raw = prepare(root, unfrozen.data, unfrozen.vocab_size, progress=False,
                          encoders=unfrozen.encoders, device=device)
            if "cached" in modes:
                start = time.perf_counter()
                features = prepare(root, frozen.data, frozen.vocab_size, progress=False,
                                   encoders=frozen.encoders, device=device)
                built = time.perf_counter() - start
                shapes = {m: tuple(fs.values.shape) for m, fs in features.features.items()}
                print(f"feature pass ({image} + {audio}, once, in `nlmm data prepare`): "
                      f"{built:.1f} s; cached arrays {shapes}")
                results["cached"] = train_once("cached", frozen, features, device, folder, plan,
                                               args.compile_backend)
            if "frozen" in modes:
                # pixels from the base cache, waveforms from the unfrozen config's feature set
                results["frozen"] = train_once("frozen", frozen, raw, device, folder, plan,
                                               args.compile_backend)
            if "e2e" in modes:
                results["e2e"] = train_once("e2e", unfrozen, raw, device, folder, plan,
                                            args.compile_backend)

        print_table(results)
        if "cached" in results:
            for other in ("frozen", "e2e"):
                if other in results:
                    print(f"ratio {other} / cached seconds per epoch: "
                          f"{results[other]['epoch_s'] / results['cached']['epoch_s']:.1f}x")
        for mode, r in results.items():
            if r.get("sync_sites"):
                print(f"host syncs per step ({mode}), by place: " + ", ".join(
                    f"{Path(site).name} {n:g}" for site, n in r["sync_sites"].items()))
        if "baseline" in results:
            r = results["baseline"]
            print(f"store: {r['store_calls']} MetricWriter.log calls, "
                  f"{100 * r['store_share']:.2f}% of the baseline's training time")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "label": args.label or ",".join(modes), "config": args.config,
                "overrides": overrides, "device": device_info,
                "corpus": {"images": cache.n_images, "captions": cache.n_captions,
                           "train_triples": len(cache.split_captions("train"))},
                "timing": "steps" if plan else "epochs",
                "plan": vars(plan) if plan else {"epochs": args.epochs},
                "results": results}, indent=2))


if __name__ == "__main__":
    main()
