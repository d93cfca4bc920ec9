"""Training throughput: seconds per epoch, triples/s, the store's share, and cached backbone features.

Writes a synthetic corpus in the Flickr8k + FACC layout, prepares it, and trains with the real
loop (`Trainer.fit`) and the real store (a SQLite file in a temp folder, `MetricWriter` wrapped
in a timer). Evaluation and checkpoint writing are timed apart and left out of the epoch time.

Modes, all with the config's NL-MM layers (`--config`):
  baseline  the config as written (patch / log-mel stems)
  cached    frozen backbones, features read from the cache `nlmm data prepare` built
  frozen    the same frozen backbones run on pixels / waveforms at every step (no feature cache)
  e2e       the backbones trained end to end (`frozen: false`)
Backbone weights are random, written to files here (no download): resnet18 + wav2vec2_tiny on
the CPU, resnet50 + HUBERT_BASE on a GPU, unless --image-backbone / --audio-backbone say other.

    .venv/bin/python bench/train_bench.py                      # tiny_cpu on the CPU
    .venv/bin/python bench/train_bench.py --images 8000 --config flickr8k   # one GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nlmm.config import AUDIO_BACKBONES, IMAGE_BACKBONES, Config, resolve_config
from nlmm.data.cache import PreparedCache, prepare
from nlmm.data.synth import synth_corpus
from nlmm.model.backbones import BackboneSpec, build_full_network
from nlmm.train.loop import Trainer, resolve_device

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


def train_once(label: str, cfg: Config, cache: PreparedCache, device: torch.device,
               folder: Path) -> dict[str, float]:
    """Fit `cfg` on `cache`; seconds per epoch without evaluation and checkpoints."""
    from nlmm import store

    run = store.create_run(label, cfg.to_dict(), str(cache.path), str(device),
                           epochs_total=cfg.train.epochs, steps_total=None)
    sink = TimedWriter(store.MetricWriter(run.id))
    trainer = Trainer(cfg, cache, device, folder / label, sink, log=lambda m: None)
    aside: dict[str, float] = {}
    trainer.evaluate = timed(trainer.evaluate, aside, "evaluate")
    trainer.checkpoint = timed(trainer.checkpoint, aside, "checkpoint")
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit()
    sink.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start - sum(aside.values())
    epochs = trainer.progress.epoch
    triples = trainer.progress.global_step * cfg.train.accumulate * cfg.train.batch_size
    return {"epoch_s": train_s / max(epochs, 1), "triples_per_s": triples / train_s,
            "store_share": sink.seconds / train_s, "store_calls": sink.calls,
            "eval_s": aside.get("evaluate", 0.0), "steps": trainer.progress.global_step}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240, help="synthetic corpus size")
    parser.add_argument("--config", default="tiny_cpu", help="config name or YAML path")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument("--image-backbone", default=None)
    parser.add_argument("--audio-backbone", default=None)
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        sys.exit(f"unknown mode {unknown[0]!r}; pick from {', '.join(MODES)}")

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    image = args.image_backbone or ("resnet50" if on_gpu else "resnet18")
    audio = args.audio_backbone or ("HUBERT_BASE" if on_gpu else "wav2vec2_tiny")
    with tempfile.TemporaryDirectory(prefix="nlmm-train-bench-") as tmp:
        folder = Path(tmp)
        os.environ["NLMM_RUNS_DIR"] = str(folder / "runs")
        root = folder / "corpus"
        start = time.perf_counter()
        synth_corpus(root, n_images=args.images, seed=0, engine="builtin", progress=False)
        overrides = [f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", *args.set]
        cfg = resolve_config(args.config, overrides)
        cache = prepare(root, cfg.data, cfg.vocab_size, progress=False)
        print(f"corpus: {args.images} synthetic images, {cache.n_captions} captions; written and "
              f"prepared in {time.perf_counter() - start:.1f} s; device {device}"
              f"{' (' + torch.cuda.get_device_name(device) + ')' if on_gpu else ''}, "
              f"torch threads {torch.get_num_threads()}")
        print(f"config {args.config}: d_model {cfg.d_model}, depth {vars(cfg.depth)}, batch "
              f"{cfg.train.batch_size}, image {cfg.data.image_size} px, amp {cfg.precision.amp}, "
              f"{args.epochs} epoch(s)")
        results: dict[str, dict[str, float]] = {}
        if "baseline" in modes:
            results["baseline"] = train_once("baseline", cfg, cache, device, folder)
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
                results["cached"] = train_once("cached", frozen, features, device, folder)
            if "frozen" in modes:
                # pixels from the base cache, waveforms from the unfrozen config's feature set
                results["frozen"] = train_once("frozen", frozen, raw, device, folder)
            if "e2e" in modes:
                results["e2e"] = train_once("e2e", unfrozen, raw, device, folder)

        print(f"{'mode':<10}{'s/epoch':>10}{'triples/s':>12}{'store share':>13}{'eval s':>9}")
        for mode, r in results.items():
            print(f"{mode:<10}{r['epoch_s']:>10.2f}{r['triples_per_s']:>12.1f}"
                  f"{100 * r['store_share']:>12.2f}%{r['eval_s']:>9.2f}")
        if "cached" in results:
            for other in ("frozen", "e2e"):
                if other in results:
                    print(f"ratio {other} / cached seconds per epoch: "
                          f"{results[other]['epoch_s'] / results['cached']['epoch_s']:.1f}x")
        if "baseline" in results:
            r = results["baseline"]
            print(f"store: {r['store_calls']} MetricWriter.log calls, "
                  f"{100 * r['store_share']:.2f}% of the baseline's training time")


if __name__ == "__main__":
    main()
