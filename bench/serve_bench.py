"""`nlmm search` at interactive speed: whole processes without and with a running `nlmm serve`,
beside a bare `python -c "import torch"` measured in the same run.

    .venv/bin/python bench/serve_bench.py [--config tiny_cpu] [--runs 7] [--items 40000]
                                          [--queries 100] [--threads N]

For a random-weight model of the config (latency does not depend on training) over a small
synthetic corpus, prints:
  - the first search of a new checkpoint (it derives the weights-only copy, hashes the
    checkpoint and builds the gallery index once);
  - median / max of a bare `python -c "import torch"`, of `nlmm search --help` (the CLI's own
    start-up: typer builds the parser of every option, and searches nothing), of a whole
    `nlmm search --no-server` process and of a whole `nlmm search` process answered by a
    running server (JSON lines and table output), run in turn for each round so that a busy
    machine slows them alike, with their ratios to the bare import;
  - p50 / p99 of the time inside the server and of the client's round trip per query, the
    server holding a gallery of `--items` spoken captions (FACC size);
  - the time a process without a server spends reading a cached `--items` index into memory:
    the synthetic corpus' own gallery is small, so the whole-process figures leave it out.
The server runs as a thread of this process, listening on its Unix socket as `nlmm serve` does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from search_bench import latencies, make_checkpoint, pct, show, unit_rows

from nlmm.config import resolve_config
from nlmm.search.engine import GalleryIndex, read_index
from nlmm.search.types import SearchRequest
from nlmm.search.serve import SearchService, serving_in_thread
from nlmm.search.client import ask_server

NLMM = Path(sys.executable).with_name("nlmm")


def timed(cmd: list[str], env: dict[str, str]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        return time.perf_counter() - start
    return run


def rounds(fns: dict[str, Callable[[], float]], n: int) -> dict[str, list[float]]:
    """Each command once per round, in turn, after one warm-up round (disk cache)."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def hold_big_gallery(service: SearchService, req: SearchRequest, gallery: np.ndarray) -> None:
    """Loads the request's model in the server and swaps its test audio gallery for `gallery`,
    whose rows cycle over the corpus' spoken captions (so every hit is formatted as usual)."""
    warm = service.pool.get(req)
    searcher = warm.searcher
    rows = np.resize(searcher.cache.split_audio_captions("test"), len(gallery))
    with warm.lock:
        searcher.indexes[("test", "audio")] = GalleryIndex(
            rows, torch.from_numpy(gallery).T.contiguous().T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--runs", type=int, default=7, help="rounds of whole processes")
    parser.add_argument("--items", type=int, default=40000, help="server gallery size")
    parser.add_argument("--queries", type=int, default=100, help="queries timed in the server")
    parser.add_argument("--images", type=int, default=24, help="synthetic corpus size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every process (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nlmm-serve-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        checkpoint, _ = make_checkpoint(folder, args.config, args.images)
        size = checkpoint.stat().st_size
        print(f"{args.config}: checkpoint {size / 2**20:.0f} MiB written in "
              f"{time.perf_counter() - start:.1f} s (corpus of {args.images} images), "
              f"{torch.get_num_threads()} torch threads")
        runs = folder / "runs"
        env = {k: v for k, v in os.environ.items() if k != "NLMM_DB_URL"}
        env.update(NLMM_RUNS_DIR=str(runs), OMP_NUM_THREADS=str(torch.get_num_threads()))
        search = [str(NLMM), "search", "a dog runs on the grass", "--checkpoint",
                  str(checkpoint), "--in", "audio", "--device", "cpu"]
        first = timed([*search, "--json", "--no-server"], env)()
        print(f"  first search of the checkpoint (weights copy, hash, index)   {first:9.2f} s")

        gallery = unit_rows(args.items, resolve_config(args.config).embed_dim, seed=0)
        os.environ["NLMM_RUNS_DIR"] = str(runs)
        req = SearchRequest(text="a dog", checkpoint=checkpoint, target="audio", k=10,
                            device="cpu")
        with serving_in_thread(runs) as service:
            hold_big_gallery(service, req, gallery)
            times = rounds({
                "python -c 'import torch'": timed([sys.executable, "-c", "import torch"], env),
                "nlmm search --help (the CLI's own start-up)": timed([str(NLMM), "search",
                                                                      "--help"], env),
                "nlmm search --no-server (whole process)": timed([*search, "--json",
                                                                   "--no-server"], env),
                "nlmm search, server running (JSON lines)": timed([*search, "--json"], env),
                "nlmm search, server running (table)": timed(search, env),
            }, args.runs)
            print(f"\nwhole processes, {args.runs} rounds (the server holds "
                  f"{args.items:,} spoken captions, the processes without it the corpus' own)")
            medians = {name: show(name, values) for name, values in times.items()}
            bare = medians["python -c 'import torch'"]
            for name, median in list(medians.items())[1:]:
                print(f"  {name:<48} {median / bare:6.2f}x the bare torch import")

            inside, round_trip = [], []
            captions = [f"a dog number {i} runs on the grass" for i in range(args.queries + 5)]
            for i, text in enumerate(captions):
                answer = ask_server(SearchRequest(text=text, checkpoint=checkpoint,
                                                  target="audio", k=10, device="cpu"))
                if i >= 5:  # warm-up
                    inside.append(answer.server_ms / 1e3)
                    round_trip.append(answer.total_ms / 1e3)
            print(f"\none text query, top-10 of {args.items:,} spoken captions, "
                  f"{args.queries} queries")
            show("time inside the server", inside)
            show("client round trip (socket, JSON)", round_trip)
            print(f"  p50 inside / round trip: {pct(inside, 50):.1f} / "
                  f"{pct(round_trip, 50):.1f} ms")

        path = folder / "big-index.npy"
        np.save(path, gallery)

        def read_and_place(_: int) -> None:
            emb = read_index(path, len(gallery), gallery.shape[1])
            torch.from_numpy(np.array(emb)).T.contiguous()  # as Searcher holds it

        print()
        show(f"read a cached {args.items:,}-item index into memory",
             latencies(read_and_place, 10, warmup=1))


if __name__ == "__main__":
    main()
