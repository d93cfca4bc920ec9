"""Search latency over a FACC-sized gallery, against faiss.IndexFlatIP measured in the same run.

    .venv/bin/python bench/search_bench.py [--items 40000] [--queries 300] [--config flickr8k]
                                           [--threads N] [--device cpu|cuda] [--json FILE]

Prints, for one query against `--items` unit embeddings of the config's width:
  - top-k p50/p99 of the exact path held in memory (nlmm.search.engine.top_k), of the exact path
    scanning a memory-mapped index file, and of faiss.IndexFlatIP (skipped when faiss-cpu is
    absent), with the ratio exact / faiss;
  - a text query end to end on a loaded Searcher (tokenize, encode, top-k, hits) with the
    config's model (random weights: latency does not depend on training) and the same gallery;
  - the time to read a cached index file of that size, a cold in-process search (model load,
    checkpoint hash, index read, query) and a whole `nlmm search` process;
  - index build throughput (items/s embedded and written) per modality on a synthetic corpus.
With `--device cuda` the gallery, the model and the queries sit on the GPU (faiss stays on the
CPU); a top-k's time includes copying its ids back to the host, as a search does. `--json`
writes every figure (milliseconds) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nlmm.config import resolve_config
from nlmm.data.cache import prepare
from nlmm.data.synth import synth_corpus
from nlmm.devices import resolve_device
from nlmm.model import NLMM
from nlmm.search.engine import GalleryIndex, SearchRequest, Searcher, read_index, run_search, top_k
from nlmm.inference.checkpoint import save_checkpoint

K = 10
FIGURES: dict[str, dict[str, float]] = {}  # label -> p50/p99 or median/max (ms), for --json


def latencies(fn: Callable[[int], object], n: int, warmup: int = 5) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3


def show(label: str, values: list[float]) -> float:
    """Prints p50/p99, or median/max for a handful of runs; returns the median in ms."""
    p50 = pct(values, 50)
    if len(values) >= 20:
        print(f"  {label:<48} p50 {p50:9.2f} ms   p99 {pct(values, 99):9.2f} ms")
        FIGURES[label.strip()] = {"p50_ms": p50, "p99_ms": pct(values, 99), "runs": len(values)}
    else:
        print(f"  {label:<48} median {p50:9.1f} ms   max {max(values) * 1e3:9.1f} ms "
              f"({len(values)} runs)")
        FIGURES[label.strip()] = {"p50_ms": p50, "max_ms": max(values) * 1e3,
                                  "runs": len(values)}
    return p50


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def interleaved(fns: dict[str, Callable[[int], object]], n: int,
                warmup: int = 5) -> dict[str, list[float]]:
    """Latencies of several ways of doing query i, run in turn for each i, so a busy machine
    slows them alike and their ratio stays fair."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(n):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            out[name].append(time.perf_counter() - start)
    return out


def bench_top_k(gallery: np.ndarray, queries: np.ndarray, folder: Path,
                device: torch.device) -> None:
    n, dim = gallery.shape
    print(f"\ntop-{K} of one query over {n:,} x {dim} float32 "
          f"({gallery.nbytes / 2**20:.0f} MiB), {len(queries)} queries, "
          f"{torch.get_num_threads()} torch threads, on {device}")
    on_device = torch.from_numpy(gallery).to(device)
    in_memory = on_device.T.contiguous().T  # the layout Searcher holds
    row_major = on_device
    q = torch.from_numpy(queries).to(device)
    fns: dict[str, Callable[[int], object]] = {
        "exact, in memory (nlmm.search.engine.top_k)": lambda i: top_k(q[i:i + 1], in_memory, K)[1].cpu(),
        "exact, (N, d) row-major tensor (for comparison)":
            lambda i: top_k(q[i:i + 1], row_major, K)[1].cpu(),
    }
    try:
        import faiss
    except ImportError:
        faiss = None
        print("  faiss.IndexFlatIP: skipped, faiss-cpu is not installed "
              "(pip install 'nlmm[faiss]')")
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatIP(dim)
        index.add(gallery)
        fns[f"faiss.IndexFlatIP ({faiss.omp_get_max_threads()} omp threads)"] = \
            lambda i: index.search(queries[i:i + 1], K)
    p50 = {name: show(name, values)
           for name, values in interleaved(fns, len(queries)).items()}
    path = folder / "gallery.npy"
    np.save(path, gallery)
    mapped = read_index(path, n, dim)
    show("exact, memory-mapped file (streamed path)",
         latencies(lambda i: top_k(q[i:i + 1], mapped, K)[1].cpu(), len(queries)))
    if faiss is None:
        return
    _, want = index.search(queries[:20], K)
    _, got = top_k(q[:20], in_memory, K)
    same = np.array_equal(np.sort(want, 1), np.sort(got.cpu().numpy(), 1))
    FIGURES["same_ids_as_faiss"] = {"value": float(same)}
    exact, flat = list(p50.values())[0], list(p50.values())[-1]
    print(f"  exact / faiss p50 ratio: {exact / flat:.2f}  (target <= 1.5; same top-{K} ids as "
          f"faiss: {same})")


def make_checkpoint(folder: Path, config: str, images: int) -> tuple[Path, float]:
    """A random-weight model of `config` over a prepared synthetic corpus; returns the
    checkpoint and the cache build time."""
    cfg = resolve_config(config)
    root = folder / "corpus"
    synth_corpus(root, n_images=images, seed=0, engine="builtin", progress=False)
    start = time.perf_counter()
    cache = prepare(root, cfg.data, cfg.vocab_size, progress=False)
    prepared = time.perf_counter() - start
    torch.manual_seed(0)
    model = NLMM(cfg)
    path = folder / "runs" / "bench" / "checkpoints" / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(),
                           "tokenizer": cache.tokenizer.to_json(),
                           "data": {"cache": str(cache.path), "key": cache.key}})
    return path, prepared


def bench_build(checkpoint: Path, device: torch.device) -> None:
    searcher = Searcher(checkpoint, device=device.type)
    print(f"\nindex build on the synthetic corpus (split all), {searcher.loaded.cfg.embed_dim}-d "
          "embeddings written to runs/<run>/index/")
    for modality in ("text", "image", "audio"):
        start = time.perf_counter()
        index = searcher.gallery("all", modality)
        seconds = time.perf_counter() - start
        n = len(index.rows)
        print(f"  {modality:<6} {n:5d} items in {seconds:6.2f} s = {n / seconds:8.1f} items/s"
              f"   (40,000 items: about {40000 / (n / seconds) / 60:.1f} min)")
        FIGURES[f"index build {modality}"] = {"items": n, "items_per_s": n / seconds}


def bench_end_to_end(checkpoint: Path, gallery: np.ndarray, n_queries: int, folder: Path,
                     device: torch.device) -> None:
    searcher = Searcher(checkpoint, device=device.type)
    cache = searcher.cache
    captions = [cache.caption_text(int(r)) for r in cache.split_captions("test")]
    # The FACC-sized gallery stands in for the corpus' own: its rows cycle over real caption
    # rows, so every hit is formatted from the cache as usual.
    rows = np.resize(cache.split_audio_captions("test"), len(gallery))
    searcher.indexes[("test", "audio")] = GalleryIndex(
        rows, torch.from_numpy(gallery).to(device).T.contiguous().T)
    print(f"\ntext query end to end on a loaded Searcher ({searcher.loaded.cfg.d_model}-wide text "
          f"encoder, {len(gallery):,} spoken captions)")
    show("Searcher.query(text, target=audio, k=10)",
         latencies(lambda i: searcher.query(text=captions[i % len(captions)], target="audio",
                                            k=K), n_queries))
    show("  of which encode_query(text)",
         latencies(lambda i: searcher.encode_query(text=captions[i % len(captions)]),
                   n_queries))

    path = folder / "index40k.npy"
    np.save(path, gallery)

    def read_and_place(_: int) -> None:
        emb = read_index(path, len(gallery), gallery.shape[1])
        torch.from_numpy(np.array(emb)).T.contiguous()  # as Searcher holds it

    show(f"read a cached {len(gallery):,}-item index into memory",
         latencies(read_and_place, 20, warmup=1))

    text = captions[0]
    show("cold run_search in this process (load + query)",
         latencies(lambda _: run_search(SearchRequest(text=text, checkpoint=checkpoint,
                                                      device=device.type)), 3, warmup=0))
    env = {k: v for k, v in os.environ.items() if k != "NLMM_DB_URL"}
    env.update(NLMM_RUNS_DIR=str(folder / "runs"), OMP_NUM_THREADS=str(torch.get_num_threads()))
    nlmm = Path(sys.executable).with_name("nlmm")
    cmd = [str(nlmm), "search", text, "--checkpoint", str(checkpoint), "--json", "--device",
           device.type]
    show("whole `nlmm search` process (start to exit)",
         latencies(lambda _: subprocess.run(cmd, check=True, capture_output=True, env=env), 3,
                   warmup=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=40000, help="gallery size (FACC: 40,000)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--config", default="flickr8k", help="model config for the query encoder")
    parser.add_argument("--images", type=int, default=24, help="synthetic corpus size")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and faiss (default: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model, the gallery and the queries sit")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dim = resolve_config(args.config).embed_dim
    gallery = unit_rows(args.items, dim, seed=0)
    queries = unit_rows(args.queries, dim, seed=1)
    with tempfile.TemporaryDirectory(prefix="nlmm-search-bench-") as tmp:
        folder = Path(tmp)
        bench_top_k(gallery, queries, folder, device)
        checkpoint, prepared = make_checkpoint(folder, args.config, args.images)
        print(f"\n(synthetic corpus of {args.images} images prepared for {args.config} in "
              f"{prepared:.1f} s)")
        bench_build(checkpoint, device)
        bench_end_to_end(checkpoint, gallery, args.queries, folder, device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "device": str(device), "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "items": args.items, "dim": dim,
            "queries": args.queries, "config": args.config, "k": K, "figures": FIGURES},
            indent=2))


if __name__ == "__main__":
    main()
