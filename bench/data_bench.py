"""Data pipeline throughput: prepare, the cached loader, and a per-sample baseline.

Builds a Flickr8k-layout corpus (Flickr-sized JPEGs, ~3 s spoken captions), prepares the cache
with every core, then serves the same training batches two ways and prints triples/s:
  cached   - TrainLoader over the prepared cache (memmap gathers, batch augmentation)
  baseline - what the original guide's Dataset did per item on every batch: decode the JPEG,
             random crop + flip it (torchvision), compute the log-mel from the WAV, tokenize
             the caption, then collate.

    .venv/bin/python bench/data_bench.py [--images 200] [--batches 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus_factory import write_public_corpus  # noqa: E402
from harness import stamp  # noqa: E402

from nlmm.config import DataConfig  # noqa: E402
from nlmm.data.cache import PreparedCache, prepare  # noqa: E402
from nlmm.data.features import IMAGE_MEAN, IMAGE_STD, load_log_mel  # noqa: E402
from nlmm.data.loader import TrainLoader  # noqa: E402


def baseline_batches(cache: PreparedCache, loader: TrainLoader, batches: range,
                     cfg: DataConfig) -> int:
    """The same rows as the cached loader, each item decoded and augmented on its own (PIL +
    torchvision transforms, log-mel from the WAV), then collated; returns items served."""
    augment = T.Compose([T.RandomResizedCrop(cfg.image_size, scale=(0.7, 1.0)),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGE_MEAN, IMAGE_STD)])
    order = loader.order()
    served = 0
    for b in batches:
        rows = order[b * loader.batch_size:(b + 1) * loader.batch_size]
        images, mels, texts = [], [], []
        for row in rows:
            with Image.open(cache.image_path(int(cache.caption_image(row)))) as img:
                images.append(augment(img.convert("RGB")))
            mels.append(torch.from_numpy(load_log_mel(cache.wav_path(row), cfg).astype(np.float32)))
            texts.append(cache.caption_text(row))
        ids, lengths = cache.tokenizer.encode_batch(texts, cfg.text_max_len)
        text = torch.from_numpy(ids[:, :int(lengths.max())].astype(np.int64))
        frames = max(m.shape[1] for m in mels)
        audio = torch.zeros(len(rows), 1, cfg.n_mels, frames)
        for i, m in enumerate(mels):
            audio[i, 0, :, :m.shape[1]] = m
        image = torch.stack(images)
        assert text.shape[0] == audio.shape[0] == image.shape[0] == len(rows)
        served += len(rows)
    return served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0, help="spoken caption length")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per loader")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (best and median shown)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both loaders while timed (the same on both sides)")
    parser.add_argument("--workers", type=int, default=None, help="prepare workers (all cores)")
    parser.add_argument("--root", type=Path, default=None, help="keep the corpus here")
    args = parser.parse_args()

    cfg = DataConfig()
    with tempfile.TemporaryDirectory(prefix="nlmm-bench-") as tmp:
        root = args.root or Path(tmp) / "flickr8k"
        n = args.images
        splits = (n * 3 // 4, n // 8, n - n * 3 // 4 - n // 8)
        start = time.perf_counter()
        written = write_public_corpus(root, n_images=n, splits=splits, image_size=(500, 375),
                                      audio_seconds=args.seconds - 0.1, texture=True)
        jpeg_kb = np.mean([p.stat().st_size for p in written.image_dir().iterdir()]) / 1024
        print(f"corpus: {n} JPEGs 500x375 (mean {jpeg_kb:.0f} KB), {len(written.wavs)} wavs of "
              f"~{args.seconds:.1f} s, written in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")

        start = time.perf_counter()
        cache = prepare(root, cfg, 8000, cache_dir=Path(tmp) / "cache", workers=args.workers,
                        progress=False)
        total = time.perf_counter() - start
        sec = cache.manifest["build_seconds"]
        wavs = cache.manifest["wavs_decoded"]
        print(f"prepare ({cache.manifest['workers']} workers, image_size {cfg.image_size}): "
              f"{total:.2f} s total; images {cache.n_images / sec['images']:.1f}/s, "
              f"wavs {wavs / sec['audio']:.1f}/s, tokenizer {sec['tokens']:.2f} s")
        start = time.perf_counter()
        prepare(root, cfg, 8000, cache_dir=Path(tmp) / "cache", workers=args.workers,
                progress=False)
        print(f"second prepare (fresh cache, no-op): {time.perf_counter() - start:.3f} s")

        n_batches = min(args.batches, len(cache.split_captions("train")) // args.batch_size)
        # The sides take turns round by round, so a neighbour's burst of CPU use on a shared
        # machine hits them alike; both run at the same torch thread count.
        torch.set_num_threads(args.threads)
        rates: dict[str, list[float]] = {"augment on": [], "augment off": [], "baseline": []}
        for _ in range(args.rounds):
            for augment in (True, False):
                loader = TrainLoader(cache, "train", args.batch_size, seed=0, crop=augment, flip=augment,
                                     device="cpu")
                rates["augment on" if augment else "augment off"].append(time_loader(loader, n_batches))
            baseline_batches(cache, loader, range(0, 1), cfg)  # warm-up, as time_loader's first batch
            start = time.perf_counter()
            served = baseline_batches(cache, loader, range(1, n_batches), cfg)
            rates["baseline"].append(served / (time.perf_counter() - start))
        print(stamp())
        print(f"loaders: batch {args.batch_size}, CPU, {args.threads} torch thread(s) on both sides, "
              f"{n_batches - 1} batches after one warm-up batch, {args.rounds} rounds (best / median)")
        best = {key: max(values) for key, values in rates.items()}
        median = {key: statistics.median(values) for key, values in rates.items()}
        for key in ("augment on", "augment off"):
            print(f"  cached loader, {key}: {best[key]:8.1f} / {median[key]:8.1f} triples/s")
        print(f"  per-sample baseline: {best['baseline']:8.1f} / {median['baseline']:8.1f} triples/s "
              f"(per item: decode JPEG, the same crop + flip, log-mel, tokenize)")
        print(f"ratio cached / baseline, same augmentation (medians): "
              f"{median['augment on'] / median['baseline']:.1f}x; cached without augmentation: "
              f"{median['augment off'] / median['baseline']:.1f}x")

def time_loader(loader: TrainLoader, n_batches: int) -> float:
    """Triples per second over batches 2..n (thread start and first page-ins excluded)."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    served = sum(len(next(it)["caption_ids"]) for _ in range(n_batches - 1))
    return served / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
