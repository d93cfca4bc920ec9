"""Chunked process-pool map used to decode a corpus on every core.

Workers are forked, so a pool starts in milliseconds with torch and the feature code already
imported, and the caller's main module is never re-run (as spawn would do). Each worker runs
torch single-threaded: one process per core is the parallelism, and a one-thread OpenMP pool
is also what keeps a forked child clear of the parent's OpenMP state.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from rich.progress import Progress, TaskID

MIN_CHUNK = 16
MAX_CHUNK = 256


def default_workers(workers: int | None) -> int:
    return max(1, workers if workers is not None else (os.cpu_count() or 1))


def _context() -> mp.context.BaseContext:
    return mp.get_context("fork")


def _init_worker() -> None:
    torch.set_num_threads(1)


def _call(job: tuple[Callable[..., list[Any]], list[Any], tuple[Any, ...]]) -> list[Any]:
    fn, chunk, args = job
    return fn(chunk, *args)


def map_chunks(fn: Callable[..., list[Any]], items: Sequence[Any], args: tuple[Any, ...] = (),
               workers: int | None = None, progress: Progress | None = None,
               task: TaskID | None = None) -> Iterator[list[Any]]:
    """Yield `fn(chunk, *args)` for consecutive chunks of `items`, in completion order.

    `fn` must be a module-level function returning one result per item of its chunk (results
    carry their own item identity since chunks finish out of order). With one worker or one
    chunk it runs in this process.
    """
    workers = default_workers(workers)
    size = max(MIN_CHUNK, min(MAX_CHUNK, math.ceil(len(items) / (workers * 8))))
    chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
    jobs = [(fn, chunk, args) for chunk in chunks]
    if workers <= 1 or len(chunks) <= 1:
        results: Iterator[list[Any]] = map(_call, jobs)
        for out in results:
            if progress is not None and task is not None:
                progress.advance(task, len(out))
            yield out
        return
    with _context().Pool(min(workers, len(chunks)), initializer=_init_worker) as pool:
        for out in pool.imap_unordered(_call, jobs):
            if progress is not None and task is not None:
                progress.advance(task, len(out))
            yield out
