"""Run fields as the short plain text of table cells and headers (durations through
nlmm.units, as the CLI writes them)."""

from __future__ import annotations

import time

from nlmm import store
from nlmm.cli.reports import epoch_text
from nlmm.units import hms


def duration(seconds: float | None) -> str:
    """`H:MM:SS` (or `D d H:MM:SS` past a day); `-` when unknown."""
    if seconds is None:
        return "-"
    days, rest = divmod(max(0, int(seconds)), 86400)
    return f"{days}d {hms(rest)}" if days else hms(rest)


def progress_fraction(run: store.Run) -> float | None:
    """Share of the planned steps done, or of the planned epochs when steps are unknown."""
    if run.steps_total:
        return min(1.0, (run.step or 0) / run.steps_total)
    if run.epochs_total:
        return min(1.0, (run.epoch or 0) / run.epochs_total)
    return None


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def compact_count(n: int) -> str:
    """1234 -> 1.2k, 1234567 -> 1.2M; short enough for a narrow column."""
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k" if n < 100_000 else f"{n // 1000}k"
    return f"{n / 1e6:.1f}M"


def epoch_step(run: store.Run) -> str:
    epochs = epoch_text(run)
    return f"{epochs} · {compact_count(run.step or 0)}"


def local_time(stamp: float | None) -> str:
    """`MM-DD HH:MM` in the local time zone; `-` when unset."""
    if stamp is None:
        return "-"
    return time.strftime("%m-%d %H:%M", time.localtime(stamp))
