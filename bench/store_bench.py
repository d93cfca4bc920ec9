"""Metric store throughput and dashboard query latency, against TensorBoard measured in the same run.

    .venv/bin/python bench/store_bench.py [--steps 10000] [--keys 8] [--series-rows 1000000]
                                          [--pg-url postgresql://user@host:port/db]

Prints metric rows/s for one MetricWriter and for four writer processes at once, on SQLite and
(with --pg-url, or NLMM_TEST_PG_URL as `.ci/run` sets it) on PostgreSQL, beside TensorBoard's
SummaryWriter.add_scalar writing the same scalars from as many processes (the ratio is store rows/s
over TensorBoard rows/s). Then the cost of one log() call, and the latency of metric_series /
metric_keys / latest_metrics on a long series beside a plain full scan and a naive GROUP BY.
On PostgreSQL the bench works in a database of its own, created and dropped here.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import make_url, text

from nlmm.store import MetricWriter, create_run, get_engine, latest_metrics, metric_keys, metric_series

WRITERS = 4


def _keys(count: int) -> list[str]:
    base = ["loss", "loss_i2t", "loss_i2a", "loss_t2a", "lr/fast", "lr/mid", "lr/slow", "throughput"]
    return (base + [f"extra/{i}" for i in range(max(0, count - len(base)))])[:count]


def _write(url: str, run_id: int, steps: int, keys: list[str]) -> None:
    with MetricWriter(run_id, engine=get_engine(url)) as writer:
        for step in range(steps):
            writer.log(step, 0, {key: step * 1e-3 + i for i, key in enumerate(keys)})


def _tensorboard(folder: str, steps: int, keys: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=folder)
    for step in range(steps):
        for i, key in enumerate(keys):
            writer.add_scalar(key, step * 1e-3 + i, step)
    writer.close()


def _timed(target: Callable[..., None], args: tuple, start: mp.Event, out: mp.Queue) -> None:
    if target is _write:
        get_engine(args[0])  # connect and migrate before the clock starts
    start.wait()
    began = time.perf_counter()
    target(*args)
    out.put((began, time.perf_counter()))


def _seconds(target: Callable[..., None], jobs: list[tuple]) -> float:
    """Wall time from the common start to the last of `jobs` (one process each) finishing."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_timed, args=(target, job, start, out)) for job in jobs]
    for process in processes:
        process.start()
    time.sleep(1.0)  # every process imported and connected
    start.set()
    spans = [out.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    return max(end for _, end in spans) - min(began for began, _ in spans)


def _rows_per_s(url: str, steps: int, keys: list[str], writers: int) -> float:
    engine = get_engine(url)
    runs = [create_run(f"bench-{uuid.uuid4().hex[:8]}", {}, "", "cpu", 1, steps, engine=engine).id
            for _ in range(writers)]
    return writers * steps * len(keys) / _seconds(_write, [(url, run, steps, keys) for run in runs])


@contextmanager
def _postgres_database(server_url: str) -> Iterator[str]:
    """A new database on the server at `server_url`, dropped on leaving."""
    import psycopg

    server = make_url(server_url).set(drivername="postgresql")
    admin = server.render_as_string(hide_password=False)
    name = f"nlmm_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _throughput(backends: dict[str, str], tmp: Path, steps: int, keys: list[str]) -> None:
    rows = steps * len(keys)
    print(f"metric rows/s, {steps} steps x {len(keys)} scalars = {rows} rows per writer "
          f"(one process per writer)")
    tb = {n: n * rows / _seconds(_tensorboard, [(str(tmp / f"tb{n}-{i}"), steps, keys)
                                                for i in range(n)])
          for n in (1, WRITERS)}
    print(f"  {'':<12}{'1 writer':>14}{f'{WRITERS} writers':>16}   store / TensorBoard (1, {WRITERS})")
    print(f"  {'TensorBoard':<12}{tb[1]:>14,.0f}{tb[WRITERS]:>16,.0f}")
    for name, url in backends.items():
        one, many = _rows_per_s(url, steps, keys, 1), _rows_per_s(url, steps, keys, WRITERS)
        print(f"  {name:<12}{one:>14,.0f}{many:>16,.0f}   {one / tb[1]:.2f}x, "
              f"{many / tb[WRITERS]:.2f}x   ({WRITERS} writers = {many / one:.2f}x one)")


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
    parser.add_argument("--pg-url", default=os.environ.get("NLMM_TEST_PG_URL"),
                        help="a PostgreSQL server to measure too (default: $NLMM_TEST_PG_URL)")
    args = parser.parse_args()
    keys = _keys(args.keys)

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = get_engine(url)
        with contextlib.ExitStack() as stack:
            backends = {"SQLite": url}
            if args.pg_url:
                backends["PostgreSQL"] = stack.enter_context(_postgres_database(args.pg_url))
            else:
                print("(no --pg-url or NLMM_TEST_PG_URL: PostgreSQL not measured)")
            _throughput(backends, Path(tmp), args.steps, keys)

        run_id = create_run("log-cost", {}, "", "cpu", 1, args.steps, engine=engine).id
        per_call = _log_call_cost(url, run_id, keys)
        print(f"  MetricWriter.log()         {per_call * 1e6:>12.2f} us per call ({len(keys)} scalars, no flush)")

        series_run = create_run("series", {}, "", "cpu", 1, args.series_rows, engine=engine).id
        began = time.perf_counter()
        _write(url, series_run, args.series_rows, ["loss"])
        fill = time.perf_counter() - began
        print(f"\nlong series (SQLite): {args.series_rows:,} rows of one key (written in {fill:.2f} s, "
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
