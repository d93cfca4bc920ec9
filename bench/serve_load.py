"""`nlmm serve` under a burst: N clients sending M searches each, all at once, to a server that
has not loaded the model yet (cold) and then again once it has (warm).

    .venv/bin/python bench/serve_load.py [--clients 8] [--queries 25] [--config tiny_cpu]
                                         [--images 24] [--threads 1]

Starts a real `nlmm serve` process on the Unix socket of a fresh runs folder holding one
random-weight checkpoint of the config (latency does not depend on training) over a small
synthetic corpus. Each client is a thread of this process that connects anew for every search,
as `nlmm search` does; they start together at a barrier. For each burst it prints the refused
connections (a client that cannot connect searches in its own process instead, seconds slower),
the answers that differ from the first answer to the same query, p50 / p99 of the client's round
trip (connect, request, answer) and the burst's wall time. The cold burst's first answers wait
for the model to load (weights copy, hash, gallery index), so its p99 is about that load time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nlmm.search.types import SearchRequest, SearchResults
from nlmm.search.client import Address, ask_server, connect, exchange, server_address

NLMM = Path(sys.executable).with_name("nlmm")
START_TIMEOUT_S = 120


@dataclass
class Burst:
    clients: int
    queries: int
    # (index into the requests, the server's results or None when it could not connect)
    answers: list[tuple[int, SearchResults | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # exceptions the clients met
    round_trips_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def refused(self) -> int:
        return sum(results is None for _, results in self.answers)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.round_trips_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def burst(reqs: list[SearchRequest], clients: int, queries: int, address: Address) -> Burst:
    """`clients` threads, each sending `queries` searches over a connection of its own per
    search, client c's q-th search being reqs[(c * queries + q) % len(reqs)]."""
    out = Burst(clients, queries)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for q in range(queries):
            i = (c * queries + q) % len(reqs)
            try:
                answer = ask_server(reqs[i], address)
            except Exception as exc:  # a burst reports every failure, it does not stop at one
                with lock:
                    out.errors.append(f"client {c}, search {q}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                out.answers.append((i, None if answer is None else answer.results))
                if answer is not None:
                    out.round_trips_ms.append(answer.total_ms)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    out.wall_s = time.perf_counter() - began
    return out


def ping(runs: Path) -> dict | None:
    address = server_address(runs)
    conn = connect(address) if address is not None else None
    if conn is None:
        return None
    with conn:
        return exchange(conn, {"op": "ping"})


@contextlib.contextmanager
def serve_process(runs: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A real `nlmm serve` for `runs`, once it answers a ping (it has loaded no model yet). Its
    output goes to `serve.log` beside `runs`: a pipe nobody reads would stall it once its
    line per answered search filled the pipe."""
    log = runs.parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(NLMM), "serve"], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping(runs):
            if proc.poll() is not None:
                raise RuntimeError(f"nlmm serve stopped: {log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("nlmm serve did not start")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)


def report(label: str, result: Burst) -> None:
    n = result.clients * result.queries
    print(f"  {label:<5} {result.clients} x {result.queries}: refused {result.refused} of {n}, "
          f"errors {len(result.errors)}, p50 {result.percentile(50):7.1f} ms, "
          f"p99 {result.percentile(99):7.1f} ms, max {max(result.round_trips_ms):7.1f} ms, "
          f"wall {result.wall_s:5.2f} s")
    for error in result.errors[:5]:
        print(f"    {error}")


def disagreements(result: Burst) -> int:
    """Answers that differ from the first answer to the same request."""
    first: dict[int, SearchResults] = {}
    differ = 0
    for i, results in result.answers:
        if results is not None:
            differ += first.setdefault(i, results) != results
    return differ


def main() -> None:
    from search_bench import make_checkpoint

    from nlmm.config import resolve_config
    from nlmm.data.cache import prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=25, help="searches per client")
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--images", type=int, default=24, help="synthetic corpus size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nlmm-serve-load-") as tmp:
        folder = Path(tmp)
        checkpoint, _ = make_checkpoint(folder, args.config, args.images)
        runs = folder / "runs"
        env = {k: v for k, v in os.environ.items() if k != "NLMM_DB_URL"}
        env.update(NLMM_RUNS_DIR=str(runs), OMP_NUM_THREADS=str(args.threads))
        os.environ.update(NLMM_RUNS_DIR=str(runs))
        os.environ.pop("NLMM_DB_URL", None)
        cfg = resolve_config(args.config)
        cache = prepare(folder / "corpus", cfg.data, cfg.vocab_size, progress=False)  # cached
        captions = [cache.caption_text(int(r)) for r in cache.split_captions("test")]
        reqs = [SearchRequest(text=text, checkpoint=checkpoint, k=5, device="cpu")
                for text in captions]
        print(f"{args.config}, {len(reqs)} distinct text queries, top-5 of the test images; "
              f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
        with serve_process(runs, env):
            address = server_address(runs)
            assert address is not None
            for label in ("cold", "warm"):
                result = burst(reqs, args.clients, args.queries, address)
                report(label, result)
                print(f"        answers that differ from the first to the same query: "
                      f"{disagreements(result)}")


if __name__ == "__main__":
    main()
