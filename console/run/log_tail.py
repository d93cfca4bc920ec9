"""The last lines of a run's log file, re-read only when the file changed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from textual.widgets import Log

TAIL_BYTES = 64 * 1024
TAIL_LINES = 200


@dataclass(frozen=True)
class Tail:
    stamp: tuple[int, int] | None  # (size, mtime_ns) of the file read; None when it is absent
    lines: tuple[str, ...]


def read_tail(path: str | Path | None, known: tuple[int, int] | None = None,
              max_lines: int = TAIL_LINES) -> Tail | None:
    """The file's last `max_lines` lines, or None when its (size, mtime) still equals `known`.

    Reads at most the last 64 KiB, so a huge log costs the same as a small one.
    """
    if not path:
        return Tail(None, ("this run has no log file",))
    try:
        st = os.stat(path)
    except OSError:
        return Tail(None, (f"log file {path} does not exist yet",))
    stamp = (st.st_size, st.st_mtime_ns)
    if stamp == known:
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, st.st_size - TAIL_BYTES))
        chunk = fh.read(TAIL_BYTES)
    lines = chunk.decode("utf-8", errors="replace").split("\n")
    if lines and not lines[-1]:
        lines.pop()
    if st.st_size > TAIL_BYTES:
        lines = lines[1:]  # the first line was cut by the seek
    # A progress bar redraws its line after carriage returns; keep what a terminal would show.
    return Tail(stamp, tuple(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines[-max_lines:]))


class LogTail(Log):
    """Shows a `Tail`; replaces its lines only when the file changed."""

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id, highlight=False, auto_scroll=True)
        self.stamp: tuple[int, int] | None = None
        self._shown_lines: tuple[str, ...] = ()

    def show(self, tail: Tail | None) -> None:
        if tail is None or (tail.stamp == self.stamp and tail.lines == self._shown_lines):
            return
        self.stamp, self._shown_lines = tail.stamp, tail.lines
        self.clear()
        self.write_lines(tail.lines)
