"""What every bench shares: the stamp on its tables and one timing rule.

The rule: each side runs `warmup` untimed calls, then `repeats` timed calls, and the sides take
turns (A, B, A, B, ...) so that a neighbour's burst of CPU on a shared machine hits both alike;
tables report min and median.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checkout's short commit, with "+dirty" when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """CPU model, cores, torch threads and the GPU if torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    line = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        line += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
        if torch.cuda.is_available():
            line += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return line


def stamp() -> str:
    """The line every RESULTS table starts with: date, commit, machine."""
    return f"{datetime.date.today().isoformat()} · commit {commit()} · {machine()}"


@dataclass(frozen=True)
class Timing:
    seconds: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def interleaved(sides: dict[str, Callable[[], object]], repeats: int = 3,
                warmup: int = 1) -> dict[str, Timing]:
    """Seconds per call of each side, the sides taking turns after their warm-up calls."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return {name: Timing(tuple(values)) for name, values in times.items()}
