"""Metric store throughput and dashboard query latency, against TensorBoard measured in the same run.

    .venv/bin/python bench/store_bench.py [--steps 10000] [--keys 8] [--series-rows 1000000]

Prints rows/s for one MetricWriter and for four writer processes sharing one SQLite file,
TensorBoard's SummaryWriter.add_scalar for the same scalars, the cost of one log() call, and
the latency of metric_series / metric_keys / latest_metrics on a long series beside a plain
full scan and a naive GROUP BY of the same rows.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from nlmm.store import MetricWriter, create_run, get_engine, latest_metrics, metric_keys, metric_series


def _keys(count: int) -> list[str]:
    base = ["loss", "loss_i2t", "loss_i2a", "loss_t2a", "lr/fast", "lr/mid", "lr/slow", "throughput"]
    return (base + [f"extra/{i}" for i in range(max(0, count - len(base)))])[:count]


def _write(url: str, run_id: int, steps: int, keys: list[str]) -> float:
    engine = get_engine(url)
    began = time.perf_counter()
    with MetricWriter(run_id, engine=engine) as writer:
        for step in range(steps):
            writer.log(step, 0, {key: step * 1e-3 + i for i, key in enumerate(keys)})
    return time.perf_counter() - began


def _write_in_process(url: str, run_id: int, steps: int, keys: list[str], start: mp.Event, out: mp.Queue) -> None:
    engine = get_engine(url)
    start.wait()
    began = time.perf_counter()
    with MetricWriter(run_id, engine=engine) as writer:
        for step in range(steps):
            writer.log(step, 0, {key: step * 1e-3 + i for i, key in enumerate(keys)})
    out.put((began, time.perf_counter()))


def _tensorboard(folder: Path, steps: int, keys: list[str]) -> float:
    from torch.utils.tensorboard import SummaryWriter

    began = time.perf_counter()
    writer = SummaryWriter(log_dir=str(folder))
    for step in range(steps):
        for i, key in enumerate(keys):
            writer.add_scalar(key, step * 1e-3 + i, step)
    writer.close()
    return time.perf_counter() - began


def _log_call_cost(url: str, run_id: int, keys: list[str], calls: int = 20000) -> float:
    # Buffer large enough that no flush happens: the cost the training loop pays per step. The
    # writer is dropped unclosed, so these rows never reach the database.
    writer = MetricWriter(run_id, engine=get_engine(url), flush_rows=calls * len(keys) + 1, flush_seconds=1e9)
    values = {key: 0.5 for key in keys}
    began = time.perf_counter()
    for step in range(calls):
        writer.log(step, 0, values)
    return (time.perf_counter() - began) / calls


def _median_ms(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000, help="logged steps per writer")
    parser.add_argument("--keys", type=int, default=8, help="scalars per step")
    parser.add_argument("--series-rows", type=int, default=1_000_000, help="rows of the long series")
    parser.add_argument("--max-points", type=int, default=500)
    args = parser.parse_args()
    keys = _keys(args.keys)
    rows = args.steps * len(keys)

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = get_engine(url)
        print(f"SQLite store, {args.steps} steps x {len(keys)} scalars = {rows} rows per writer")

        single = _write(url, create_run("single", {}, "", "cpu", 1, args.steps, engine=engine).id, args.steps, keys)
        tb = _tensorboard(Path(tmp) / "tb", args.steps, keys)
        print(f"  one MetricWriter           {rows / single:>12,.0f} rows/s  ({single:.2f} s)")
        print(f"  TensorBoard add_scalar     {rows / tb:>12,.0f} rows/s  ({tb:.2f} s)")
        print(f"  store / TensorBoard        {tb / single:>12.2f}x")

        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        run_ids = [create_run(f"multi{i}", {}, "", "cpu", 1, args.steps, engine=engine).id for i in range(4)]
        processes = [ctx.Process(target=_write_in_process, args=(url, run_id, args.steps, keys, start, out))
                     for run_id in run_ids]
        for process in processes:
            process.start()
        time.sleep(0.5)
        start.set()
        spans = [out.get(timeout=300) for _ in processes]
        for process in processes:
            process.join()
        wall = max(end for _, end in spans) - min(began for began, _ in spans)
        print(f"  4 writer processes         {4 * rows / wall:>12,.0f} rows/s together  ({wall:.2f} s, "
              f"{4 * rows / wall / (rows / single):.2f}x one writer)")

        per_call = _log_call_cost(url, run_ids[0], keys)
        print(f"  MetricWriter.log()         {per_call * 1e6:>12.2f} us per call ({len(keys)} scalars, no flush)")

        series_run = create_run("series", {}, "", "cpu", 1, args.series_rows, engine=engine).id
        fill = _write(url, series_run, args.series_rows, ["loss"])
        print(f"\nlong series: {args.series_rows:,} rows of one key (written in {fill:.2f} s, "
              f"{args.series_rows / fill:,.0f} rows/s)")
        with engine.connect() as conn:
            def full_scan() -> None:
                conn.execute(text("SELECT avg(value) FROM metrics WHERE run_id = :r AND key = 'loss'"),
                             {"r": series_run}).all()

            def group_by() -> None:
                conn.execute(text("SELECT min(step), avg(value) FROM metrics WHERE run_id = :r AND key = 'loss' "
                                  "GROUP BY step * :n / :range"),
                             {"r": series_run, "n": args.max_points, "range": args.series_rows}).all()

            scan_ms, group_ms = _median_ms(full_scan), _median_ms(group_by)
        series_ms = _median_ms(lambda: metric_series(series_run, "loss", args.max_points, engine=engine))
        points = len(metric_series(series_run, "loss", args.max_points, engine=engine))
        print(f"  metric_series ({points} points)  {series_ms:>8.1f} ms")
        print(f"  naive GROUP BY bucket        {group_ms:>8.1f} ms  ({group_ms / series_ms:.2f}x metric_series)")
        print(f"  plain avg() full scan        {scan_ms:>8.1f} ms  (floor for an exact mean of every row)")
        print(f"  metric_keys                  {_median_ms(lambda: metric_keys(series_run, engine=engine)):>8.2f} ms")
        print(f"  latest_metrics               "
              f"{_median_ms(lambda: latest_metrics(series_run, engine=engine)):>8.2f} ms")


if __name__ == "__main__":
    main()
