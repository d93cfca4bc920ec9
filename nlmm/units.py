"""How durations and sizes are written for people, in one place (train.log, the CLI, the dash)."""

from __future__ import annotations

import os
from pathlib import Path


def hms(seconds: float | None) -> str:
    """`H:MM:SS`, `-` when unknown."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def recall_cell(value: float | None, missing: str = "-") -> str:
    """A Recall@K percentage to one decimal; `missing` when there is none (or it is NaN)."""
    return missing if value is None or value != value else f"{value:.1f}"


def file_size(nbytes: float | None) -> str:
    """`10.39 GB` from a gigabyte on, `721 MB`, `12 kB`, `512 B` below; `-` when unknown.

    Decimal units (1 MB = 10^6 bytes), as disks are sold and as train.log counts: a file, a
    GPU's memory or a checkpoint estimate reads the same in every command and in the dash.
    """
    if nbytes is None:
        return "-"
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 0), ("kB", 1e3, 0)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{int(nbytes)} B"


def size_on_disk(path: str | os.PathLike[str]) -> int | None:
    """The file's size now, None when it is gone: a checkpoint truncated or deleted since the
    store recorded it must not keep showing the size it was saved with."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return None
