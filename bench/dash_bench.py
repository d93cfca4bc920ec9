"""`nlmm dash` responsiveness on a large store, headless, against a small run in the same store.

    .venv/bin/python bench/dash_bench.py [--runs 20] [--rows 1000000] [--refreshes 5]

Fills a fresh SQLite store (in a child process, so this process's memory is the dashboard's
alone) with `--runs` runs, one of which holds `--rows` metric rows; the others hold 1,000 rows
each and the smallest of them is the baseline. Then, for the big run and the baseline run:

  first paint  - from creating the app to the run screen painted with its loss chart
                 (store reads, downsampling, plotext figure, Textual render);
  live refresh - a writer flushes one new step of every key, then one poll: from the poll's
                 start to the chart showing the new step (the poll timer's wait excluded;
                 the dash polls every second);

plus the runs screen's first paint with all runs listed, and the peak RSS of the process.
Targets: first paint <= 1 s, refresh <= 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select, update

from nlmm import store

KEYS = ("loss", "loss_i2t", "loss_i2a", "loss_t2a", "lr/fast", "lr/mid", "lr/slow",
        "triples_per_s", "temperature", "grad_norm")
SMALL_ROWS = 1000


def _values(step: int) -> dict[str, float]:
    decay = math.exp(-step / 50_000)
    return {key: (i + 1) * decay + 0.01 * (step % 13) for i, key in enumerate(KEYS)}


def _fill(runs: int, rows: int) -> None:
    """Child process: `runs - 1` runs of SMALL_ROWS rows, then one of `rows` rows."""
    for index in range(runs):
        steps = (rows if index == runs - 1 else SMALL_ROWS) // len(KEYS)
        run = store.create_run(f"bench-{index:02d}", {}, data="bench", device="cpu",
                               epochs_total=10, steps_total=steps * 2)
        store.set_status(run.id, "running", pid=os.getpid())
        with store.MetricWriter(run.id, flush_rows=50_000, flush_seconds=3600) as writer:
            for step in range(steps):
                writer.log(step, step * 10 // (steps * 2), _values(step))
        # Another host's run is never marked lost by this one, so it stays live for the bench.
        with store.write_session() as session:
            session.exec(update(store.Run).where(store.Run.id == run.id).values(host="bench-host"))


async def _until(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the dashboard did not reach the expected state in time")
        await pilot.pause(0.001)


async def _first_paint_runs(size: tuple[int, int]) -> tuple[float, int]:
    from console.app import NlmmDash

    began = time.perf_counter()
    app = NlmmDash(poll_s=3600)
    async with app.run_test(size=size) as pilot:
        await _until(pilot, lambda: getattr(app.screen, "polls", 0) >= 1)
        await pilot.pause()  # one render of what the poll applied
        elapsed = time.perf_counter() - began
        rows = app.screen.query_one("#runs-table").row_count
    return elapsed, rows


async def _run_screen(run_id: int, last_step: int, refreshes: int,
                      size: tuple[int, int]) -> tuple[float, list[float], list[float], int]:
    """First paint of the run screen, then `refreshes` live refreshes after real writes."""
    from console.app import NlmmDash
    from console.widgets.chart import MetricChart

    began = time.perf_counter()
    app = NlmmDash(run_id=run_id, poll_s=3600)  # polls are triggered by hand below
    async with app.run_test(size=size) as pilot:
        await _until(pilot, lambda: bool(app.screen.query(MetricChart))
                     and bool(app.screen.query_one("#chart-loss", MetricChart).series))
        await pilot.pause()
        first_paint = time.perf_counter() - began
        screen = app.screen
        chart = screen.query_one("#chart-loss", MetricChart)
        points = len(chart.series["loss"])
        applied, painted = [], []
        writer = store.MetricWriter(run_id)
        for i in range(refreshes):
            step = last_step + 1 + i
            writer.log(step, 0, _values(step))
            writer.flush()
            await pilot.pause()
            start = time.perf_counter()
            screen.poll()
            await _until(pilot, lambda: chart.series["loss"][-1][0] == step)
            applied.append(time.perf_counter() - start)
            await pilot.pause()  # the repaint of the re-plotted chart
            painted.append(time.perf_counter() - start)
        writer.close()
    return first_paint, applied, painted, points


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--size", default="120x40", help="terminal size, WIDTHxHEIGHT")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="nlmm-dash-bench-"))
    try:
        _bench(folder, args.runs, args.rows, args.refreshes, args.size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bench(folder: Path, n_runs: int, n_rows: int, refreshes: int, size_text: str) -> None:
    size = tuple(int(v) for v in size_text.split("x"))
    os.environ["NLMM_RUNS_DIR"] = str(folder)
    os.environ["NLMM_DB_URL"] = f"sqlite:///{folder / 'nlmm.db'}"
    began = time.perf_counter()
    child = mp.get_context("spawn").Process(target=_fill, args=(n_runs, n_rows))
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"filling the store failed (exit code {child.exitcode})")
    fill_s = time.perf_counter() - began

    runs = {run.name: run for run in store.list_runs()}
    big = runs[f"bench-{n_runs - 1:02d}"]
    small = runs["bench-00"]
    with store.read_session() as session:
        big_rows = session.scalar(select(func.count()).where(store.Metric.run_id == big.id))
    print(f"store: {len(runs)} runs, {big_rows:,} metric rows in {big.name} "
          f"({SMALL_ROWS:,} in each other run), filled in {fill_s:.1f} s; terminal {size_text}")
    rss_before = _peak_rss_mib()

    runs_paint, listed = asyncio.run(_first_paint_runs(size))
    small_paint, small_applied, small_refresh, small_points = asyncio.run(
        _run_screen(small.id, small.step, refreshes, size))
    big_paint, big_applied, big_refresh, big_points = asyncio.run(
        _run_screen(big.id, big.step, refreshes, size))

    ms = 1000.0
    print(f"runs screen, first paint ({listed} runs):       {runs_paint * ms:7.1f} ms")
    print(f"run screen, first paint, baseline ({SMALL_ROWS:,} rows): {small_paint * ms:7.1f} ms "
          f"({small_points} points/line)")
    print(f"run screen, first paint, {big_rows:,} rows:      {big_paint * ms:7.1f} ms "
          f"({big_points} points/line)   x{big_paint / small_paint:.2f} of baseline   "
          f"target <= 1000 ms: {'met' if big_paint <= 1.0 else 'MISSED'}")
    print(f"live refresh, baseline: median {statistics.median(small_refresh) * ms:6.1f} ms, "
          f"max {max(small_refresh) * ms:6.1f} ms (data in the chart after "
          f"{statistics.median(small_applied) * ms:.1f} ms)")
    big_median = statistics.median(big_refresh)
    print(f"live refresh, {big_rows:,} rows: median {big_median * ms:6.1f} ms, "
          f"max {max(big_refresh) * ms:6.1f} ms   x{big_median / statistics.median(small_refresh):.2f} "
          f"of baseline   target <= 200 ms: {'met' if max(big_refresh) <= 0.2 else 'MISSED'}")
    print(f"  of which store read + apply (data in the chart): median "
          f"{statistics.median(big_applied) * ms:.1f} ms; the rest is plotext and Textual's paint")
    print(f"peak RSS: {_peak_rss_mib():.0f} MiB (after imports and store setup: {rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
