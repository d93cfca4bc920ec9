"""How durations are written for people, in one place (train.log, the CLI and the dash)."""

from __future__ import annotations


def hms(seconds: float | None) -> str:
    """`H:MM:SS`, `-` when unknown."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"
