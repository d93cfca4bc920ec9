"""Packed, streamed shards (nlmm.data.packed + nlmm.data.stream) against the prepared cache.

A synthetic corpus of tiny but distinct samples, written as a JSONL manifest (read by the
manifest adapter, so both sides read the very same corpus): per sample a JPEG (a random 6x6
colour grid upsampled to --px pixels, plus noise), a 0.5 s FLAC (a tone of its own frequency
and envelope, plus noise) read as the caption's spoken reading, and a caption of random words.
Measured on this machine:

1. pack throughput: `pack()` of the whole corpus and of a --subset of it (samples/s);
2. training-loader samples/s on the subset: StreamTrainLoader (decode + log-mel + crop/flip in
   --workers processes) against the prepared cache's TrainLoader (pre-decoded arrays, crop/flip
   on the batch), the same augmentation on both sides, one epoch each;
3. peak RSS of a process streaming --rss-batches batches from the subset's pack and from the
   whole pack (main process and its largest loader worker), and of the cache loader;
4. disk bytes per sample: pack vs prepared cache vs the corpus's media files.

    .venv/bin/python bench/stream_bench.py --small      # 2,000 samples, a minute or two
    .venv/bin/python bench/stream_bench.py              # 200,000 samples (see STREAM_NOTES.md)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("red green blue yellow purple orange white black small large round square bright dark "
         "dog cat bird horse child man woman boat car tree house river field street beach snow "
         "runs jumps sits stands walks plays swims looks holds carries rides climbs near under "
         "over beside behind inside a the two three some many with on in at").split()


# --------------------------------------------------------------------------- the corpus

def _sample(i: int, px: int, root: Path) -> dict:
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(i)
    grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((px, px), Image.BILINEAR), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    sub = f"{i // 1000:04d}"
    image = Path("img") / sub / f"{i:07d}.jpg"
    audio = Path("wav") / sub / f"{i:07d}.flac"
    (root / image).parent.mkdir(parents=True, exist_ok=True)
    (root / audio).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / image, quality=85)
    t = np.arange(8000) / 16000
    hz = 150 + rng.random() * 750
    env = np.minimum(1, np.minimum(t, 0.5 - t) * 20)
    wave = 0.3 * env * np.sin(2 * np.pi * hz * t + rng.random() * 6.28)
    wave = (wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
    sf.write(root / audio, wave, 16000, format="FLAC")
    words = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 12))))
    h = (i * 2654435761) % 100
    split = "train" if h < 90 else "dev" if h < 95 else "test"
    return {"image": str(image), "audio": str(audio), "text": f"{words} {i}", "split": split,
            "group": f"s{i:07d}"}


def _samples_chunk(ids: list[int], px: int, root: str) -> list[dict]:
    return [_sample(i, px, Path(root)) for i in ids]


def write_corpus(root: Path, n: int, subset: int, px: int, workers: int) -> tuple[Path, Path]:
    """Media files plus manifest.jsonl (n rows) and subset/manifest.jsonl (the first `subset`
    rows, paths pointing at the same files)."""
    from nlmm.data.parallel import map_chunks

    full, part = root / "manifest.jsonl", root / "subset" / "manifest.jsonl"
    if full.is_file() and part.is_file() and sum(1 for _ in open(full)) == n:
        return full, part
    rows: list[dict] = []
    for chunk in map_chunks(_samples_chunk, list(range(n)), args=(px, str(root)), workers=workers):
        rows += chunk
    rows.sort(key=lambda r: r["group"])
    full.write_text("".join(json.dumps(r) + "\n" for r in rows))
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text("".join(json.dumps({**r, "image": f"../{r['image']}",
                                        "audio": f"../{r['audio']}"}) + "\n"
                            for r in rows[:subset]))
    return full, part


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the two sides

def do_pack(manifest: Path, out: Path, cfg, workers: int, vocab: int) -> dict:
    from nlmm.data.corpora import read_corpus
    from nlmm.data.packed import pack

    corpus = read_corpus(manifest)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = pack(corpus, out, vocab_size=vocab, data_cfg=cfg, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    groups = report.counts["total"]["groups"]
    return {"groups": groups, "seconds": seconds, "samples_per_s": groups / seconds,
            "bytes": report.bytes, "shards": report.shards, "defects": len(report.defects)}


def cache_prepare(manifest: Path, out: Path, cfg, workers: int, vocab: int) -> dict:
    """The prepared-cache side (nlmm.data.cache.prepare), timed."""
    from nlmm.data.cache import prepare

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cache = prepare(manifest, cfg, vocab, cache_dir=out, workers=workers, progress=False,
                    force=True)
    seconds = time.perf_counter() - start
    rows = int(cache.n_captions)
    return {"rows": rows, "seconds": seconds, "samples_per_s": rows / seconds,
            "bytes": du(out)}


def cache_epoch(cache_dir: Path, cfg, batch: int, seed: int, batches: int | None = None) -> dict:
    """One epoch (or `batches`) of the cache's TrainLoader with crop + flip on the CPU."""
    from nlmm.data.cache import PreparedCache
    from nlmm.data.loader import TrainLoader

    cache = PreparedCache.open(cache_dir, verify_sources=False)
    start = time.perf_counter()
    loader = TrainLoader(cache, "train", batch, seed=seed, epoch=0, device="cpu", crop=True,
                         flip=True)
    rows = 0
    for n, b in enumerate(loader, 1):
        rows += len(b["caption_ids"])
        if batches and n >= batches:
            break
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "samples_per_s": rows / seconds}


def stream_epoch(pack_dir: Path, cfg, batch: int, seed: int, workers: int,
                 batches: int | None = None, verify: bool = True) -> dict:
    from nlmm.data.stream import StreamTrainLoader

    start = time.perf_counter()
    loader = StreamTrainLoader(pack_dir, batch_size=batch, seed=seed, data_cfg=cfg,
                               num_workers=workers, crop=True, flip=True, verify_shards=verify)
    rows = 0
    for n, b in enumerate(loader, 1):
        rows += len(b["caption_ids"])
        if batches and n >= batches:
            break
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "samples_per_s": rows / seconds}


def peak_rss(kind: str, path: Path, args: argparse.Namespace) -> dict:
    """Peak RSS (MB) of a fresh process that reads `args.rss_batches` batches: its own and its
    largest child's (the loader workers)."""
    cmd = [sys.executable, __file__, "--rss-child", kind, str(path), "--batch", str(args.batch),
           "--workers", str(args.workers), "--px", str(args.px),
           "--rss-batches", str(args.rss_batches)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_child(kind: str, path: str, args: argparse.Namespace) -> None:
    """Runs in the fresh process: RSS after the imports (torch alone is ~600 MB), then the
    peak while reading, sampled every 0.1 s: the main process's RSS and the sum of the loader
    workers' USS (their own pages; forked workers share the parent's, which RSS counts again)."""
    import threading

    import psutil

    import nlmm.data.loader  # noqa: F401
    import nlmm.data.stream  # noqa: F401

    me = psutil.Process()
    base = me.memory_info().rss
    peak = {"main": base, "workers": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak["main"] = max(peak["main"], me.memory_info().rss)
            uss = 0
            for child in me.children(recursive=True):
                with __import__("contextlib").suppress(psutil.Error):
                    uss += child.memory_full_info().uss
            peak["workers"] = max(peak["workers"], uss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    cfg = data_cfg(args.px)
    if kind == "stream":
        out = stream_epoch(Path(path), cfg, args.batch, 0, args.workers, args.rss_batches)
    else:
        out = cache_epoch(Path(path), cfg, args.batch, 0, args.rss_batches)
    stop.set()
    thread.join()
    out.update(base_mb=base / 1e6, main_mb=peak["main"] / 1e6,
               worker_mb=peak["workers"] / 1e6)
    print(json.dumps(out))


def data_cfg(px: int):
    from nlmm.config import DataConfig

    return DataConfig(image_size=px, max_audio_seconds=2.0, text_max_len=32)


# --------------------------------------------------------------------------- report

def loader_rates(args: argparse.Namespace, cfg, res: dict) -> None:
    """Training-loader samples/s of both sides on the subset, one epoch each, interleaved
    (cache, stream, cache, stream, ...) so that the shared box's load falls on both alike."""
    res["cache_epochs"], res["stream_epochs"] = [], []
    for i in range(args.repeats):
        res["cache_epochs"].append(cache_epoch(args.out / "cache_subset", cfg, args.batch, i))
        res["stream_epochs"].append(stream_epoch(args.out / "pack_subset", cfg, args.batch, i,
                                                 args.workers))
        print(f"epoch pair {i + 1}: cache {res['cache_epochs'][-1]['samples_per_s']:.0f}, "
              f"stream {res['stream_epochs'][-1]['samples_per_s']:.0f} samples/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2,000 samples, subset 1,000")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--subset", type=int, default=20_000)
    ap.add_argument("--px", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="loader epochs per side, interleaved")
    ap.add_argument("--rss-batches", type=int, default=100)
    ap.add_argument("--loader-only", action="store_true",
                    help="only the subset: pack, prepare, loader rates (no full pack, no RSS)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/nlmm_stream_bench"))
    ap.add_argument("--rss-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child, args)
        return
    if args.small:
        args.samples, args.subset, args.rss_batches = 2000, 1000, 10
        args.out = args.out.with_name(args.out.name + "_small")
    cfg = data_cfg(args.px)
    res: dict = {"samples": args.samples, "subset": args.subset, "px": args.px,
                 "batch": args.batch, "workers": args.workers, "repeats": args.repeats}
    t = time.perf_counter()
    full, part = write_corpus(args.out / "corpus", args.samples, args.subset, args.px,
                              args.workers)
    res["corpus_seconds"] = time.perf_counter() - t
    media = sum((full.parent / r[k]).stat().st_size for line in open(full)
                for r in [json.loads(line)] for k in ("image", "audio"))
    res["media_bytes_per_sample"] = media / args.samples
    print(f"corpus: {args.samples} samples, {media / args.samples:.0f} B of media each "
          f"({res['corpus_seconds']:.0f} s to write)", flush=True)

    if not args.loader_only:
        res["pack_full"] = do_pack(full, args.out / "pack_full", cfg, args.workers, args.vocab)
        print("pack full:", res["pack_full"], flush=True)
    res["pack_subset"] = do_pack(part, args.out / "pack_subset", cfg, args.workers, args.vocab)
    print("pack subset:", res["pack_subset"], flush=True)
    res["cache_prepare"] = cache_prepare(part, args.out / "cache_subset", cfg, args.workers,
                                         args.vocab)
    print("cache prepare:", res["cache_prepare"], flush=True)
    loader_rates(args, cfg, res)
    if not args.loader_only:
        res["rss_cache"] = peak_rss("cache", args.out / "cache_subset", args)
        res["rss_stream_subset"] = peak_rss("stream", args.out / "pack_subset", args)
        res["rss_stream_full"] = peak_rss("stream", args.out / "pack_full", args)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    print(report(res))


def _rates(runs: list[dict]) -> tuple[float, float]:
    rates = sorted(r["samples_per_s"] for r in runs)
    return rates[0], statistics.median(rates)


def report(r: dict) -> str:
    out = io.StringIO()
    w = out.write
    ps, cp = r["pack_subset"], r["cache_prepare"]
    w(f"\n== stream bench: {r['samples']} samples ({r['subset']} subset), {r['px']} px, "
      f"batch {r['batch']}, {r['workers']} workers\n")
    pf = r.get("pack_full")
    if pf:
        w(f"pack        full   {pf['groups']:>8} groups {pf['seconds']:8.1f} s "
          f"{pf['samples_per_s']:8.0f} samples/s  {pf['shards']} shards\n")
    w(f"pack        subset {ps['groups']:>8} groups {ps['seconds']:8.1f} s "
      f"{ps['samples_per_s']:8.0f} samples/s\n")
    w(f"prepare     subset {cp['rows']:>8} rows   {cp['seconds']:8.1f} s "
      f"{cp['samples_per_s']:8.0f} samples/s  (pack/prepare: "
      f"{ps['samples_per_s'] / cp['samples_per_s']:.2f}x)\n")
    (s_min, s_med), (c_min, c_med) = _rates(r["stream_epochs"]), _rates(r["cache_epochs"])
    pairs = sorted(s["samples_per_s"] / c["samples_per_s"]
                   for s, c in zip(r["stream_epochs"], r["cache_epochs"], strict=True))
    w(f"train epoch stream {r['stream_epochs'][0]['rows']:>8} rows, {len(pairs)} epochs: "
      f"min {s_min:6.0f}, median {s_med:6.0f} samples/s\n")
    w(f"train epoch cache  {r['cache_epochs'][0]['rows']:>8} rows, {len(pairs)} epochs: "
      f"min {c_min:6.0f}, median {c_med:6.0f} samples/s\n")
    w(f"stream/cache: medians {s_med / c_med:.2f}x; per interleaved pair min "
      f"{pairs[0]:.2f}x, median {statistics.median(pairs):.2f}x\n")
    for key, label in (("rss_stream_subset", f"stream {r['subset']}"),
                       ("rss_stream_full", f"stream {r['samples']}"),
                       ("rss_cache", f"cache {r['subset']}")):
        m = r.get(key)
        if m and "main_mb" in m:
            w(f"peak memory {label:>14}: main RSS {m['main_mb']:6.0f} MB ({m['base_mb']:.0f} after "
              f"imports), workers' USS {m['worker_mb']:6.0f} MB ({m['rows']} rows read)\n")
        elif m:
            w(f"peak RSS    {label:>14}: {m['error']}\n")
    a, b = r.get("rss_stream_subset", {}), r.get("rss_stream_full", {})
    if "main_mb" in a and "main_mb" in b:
        grow = (b["main_mb"] - b["base_mb"]) / max(1e-9, a["main_mb"] - a["base_mb"])
        w(f"            full/subset: main {b['main_mb'] / a['main_mb']:.2f}x (growth over "
          f"imports {grow:.2f}x), workers {b['worker_mb'] / max(1e-9, a['worker_mb']):.2f}x "
          f"for {r['samples'] / r['subset']:.0f}x the samples\n")
    per_pack = ps["bytes"] / ps["groups"]
    per_cache = cp["bytes"] / cp["rows"]
    w(f"disk/sample media {r['media_bytes_per_sample']:8.0f} B, pack {per_pack:8.0f} B, "
      f"cache {per_cache:8.0f} B (pack/cache: {per_pack / per_cache:.2f}x)\n")
    return out.getvalue()


if __name__ == "__main__":
    main()
