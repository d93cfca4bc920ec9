"""Whether a run's worker still runs: the one liveness rule of the launcher, of the sweep that
marks silent runs lost (`mark_lost`), and of `nlmm runs ls`'s quick read. No database code here."""

from __future__ import annotations

import socket
import time
from typing import Protocol

import psutil

from nlmm.store.status import ACTIVE_STATUSES

# Clock granularity and the gap between fork and the worker registering its pid.
_PID_START_SLACK_S = 2.0
# A run of this host is declared lost once its heartbeat (every second from the worker) is this
# old and its process is gone; the process check rules out false alarms on a busy machine, so
# the window only needs to cover a few missed beats, and a killed worker shows as lost within 10 s.
LOST_AFTER_S = 5.0


class RunLike(Protocol):
    """The columns of a run the rule reads (a store.Run, or a row of the quick reader)."""

    status: str
    pid: int | None
    host: str
    created_at: float
    started_at: float | None
    heartbeat_at: float | None


def _last_sign(run: RunLike) -> float:
    """When the run last showed it was alive: its heartbeat, else its worker's start, else its
    registration."""
    return run.heartbeat_at or run.started_at or run.created_at


def _process_alive(pid: int | None, started_at: float | None) -> bool:
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # A process that began after the run registered it is another program that reused the pid.
        return started_at is None or process.create_time() <= started_at + _PID_START_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def worker_alive(run: RunLike) -> bool:
    """Whether the worker registered for `run` still runs: the one liveness rule of the launcher
    (before it signals or replaces a worker) and of `mark_lost`.

    On this host: its process exists, is no zombie, and began no later than it was registered,
    so a pid reused by another program does not count. On another host, where processes cannot
    be checked: its heartbeat is younger than LOST_AFTER_S.
    """
    if run.host and run.host != socket.gethostname():
        return time.time() - _last_sign(run) < LOST_AFTER_S
    return _process_alive(run.pid, run.started_at)


def is_lost(run: RunLike, now: float, timeout_s: float = LOST_AFTER_S) -> bool:
    """Whether `run` should be marked lost: active, its worker registered on this host, silent
    for `timeout_s` and no longer alive. Runs of other hosts are never judged lost from here."""
    if run.status not in ACTIVE_STATUSES or run.pid is None or run.host != socket.gethostname():
        return False
    return _last_sign(run) < now - timeout_s and not worker_alive(run)
