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

from harness import interleaved, stamp

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


def _warm(target: Callable[..., None], args: tuple) -> None:
    """Everything a side needs before its clock starts: the store connects and migrates, the
    TensorBoard side imports its writer (torch is the cost there)."""
    if target is _write:
        get_engine(args[0])
    else:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401


def _timed(target: Callable[..., None], args: tuple, start: mp.Event, out: mp.Queue) -> None:
    _warm(target, args)
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
    time.sleep(2.0)  # every process imported and warmed
    start.set()
    spans = [out.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    return max(end for _, end in spans) - min(began for began, _ in spans)


def _store_jobs(url: str, steps: int, keys: list[str], writers: int) -> list[tuple]:
    engine = get_engine(url)
    return [(url, create_run(f"bench-{uuid.uuid4().hex[:8]}", {}, "", "cpu", 1, steps,
                             engine=engine).id, steps, keys) for _ in range(writers)]


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


def _throughput(backends: dict[str, str], tmp: Path, steps: int, keys: list[str],
                repeats: int) -> None:
    """Rows/s of each side with 1 and WRITERS processes, the sides taking turns `repeats` times
    (every side warmed the same way before its clock starts)."""
    rows = steps * len(keys)
    print(f"metric rows/s, {steps} steps x {len(keys)} scalars = {rows} rows per writer "
          f"(one process per writer; min and median of {repeats} turns)")
    rates: dict[tuple[str, int], list[float]] = {}
    for turn in range(repeats):
        for n in (1, WRITERS):
            sides = {"TensorBoard": (_tensorboard, [(str(tmp / f"tb{turn}-{n}-{i}"), steps, keys)
                                                     for i in range(n)])}
            sides.update({name: (_write, _store_jobs(url, steps, keys, n))
                          for name, url in backends.items()})
            for name, (target, jobs) in sides.items():
                rates.setdefault((name, n), []).append(n * rows / _seconds(target, jobs))

    def cell(name: str, n: int) -> str:
        values = rates[(name, n)]
        return f"{max(values):>10,.0f} / {statistics.median(values):>9,.0f}"

    print(f"  {'':<12}{'1 writer best / median':>24}{f'{WRITERS} writers best / median':>26}"
          f"   store / TensorBoard, medians (1, {WRITERS})")
    print(f"  {'TensorBoard':<12}  {cell('TensorBoard', 1)}    {cell('TensorBoard', WRITERS)}")
    for name in backends:
        ratios = [statistics.median(rates[(name, n)]) / statistics.median(rates[("TensorBoard", n)])
                  for n in (1, WRITERS)]
        print(f"  {name:<12}  {cell(name, 1)}    {cell(name, WRITERS)}   "
              f"{ratios[0]:.2f}x, {ratios[1]:.2f}x")


def _log_call_cost(url: str, run_id: int, keys: list[str], calls: int = 20000) -> float:
    # Buffer large enough that no flush happens: the cost the training loop pays per step. The
    # writer is dropped unclosed, so these rows never reach the database.
    writer = MetricWriter(run_id, engine=get_engine(url), flush_rows=calls * len(keys) + 1, flush_seconds=1e9)
    values = {key: 0.5 for key in keys}
    began = time.perf_counter()
    for step in range(calls):
        writer.log(step, 0, values)
    return (time.perf_counter() - began) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000, help="logged steps per writer")
    parser.add_argument("--keys", type=int, default=8, help="scalars per step")
    parser.add_argument("--series-rows", type=int, default=1_000_000, help="rows of the long series")
    parser.add_argument("--max-points", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per side (>= 3)")
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
            print(stamp())
            _throughput(backends, Path(tmp), args.steps, keys, args.repeats)

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

            times = interleaved({
                "series": lambda: metric_series(series_run, "loss", args.max_points, engine=engine),
                "group_by": group_by, "scan": full_scan,
                "keys": lambda: metric_keys(series_run, engine=engine),
                "latest": lambda: latest_metrics(series_run, engine=engine)}, repeats=max(5, args.repeats))
        points = len(metric_series(series_run, "loss", args.max_points, engine=engine))

        def ms(name: str) -> str:
            return f"{times[name].min * 1000:>8.2f} / {times[name].median * 1000:>8.2f} ms"

        print(f"  (min / median of {len(times['series'].seconds)} interleaved calls, after one warm-up each)")
        print(f"  metric_series ({points} points)  {ms('series')}")
        print(f"  naive GROUP BY bucket        {ms('group_by')}  "
              f"({times['group_by'].median / times['series'].median:.2f}x metric_series, medians)")
        print(f"  plain avg() full scan        {ms('scan')}  (floor for an exact mean of every row)")
        print(f"  metric_keys                  {ms('keys')}")
        print(f"  latest_metrics               {ms('latest')}")

if __name__ == "__main__":
    main()
