"""Run statuses, without the database machinery, so that readers that skip SQLAlchemy (`nlmm runs
ls` through nlmm.store.sqlite_reader) share them."""

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a run is in its life. The column keeps the plain string, and a member equals its
    string, so rows read back compare with these members as they are."""

    QUEUED = "queued"  # registered; its worker is starting
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"  # on request, after a checkpoint: it can be resumed
    FAILED = "failed"
    LOST = "lost"  # its worker disappeared without reporting


# A run with a (possibly) live worker: it blocks a resume or a removal, and can be stopped.
ACTIVE_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)
ENDED_STATUSES = tuple(status for status in RunStatus if status not in ACTIVE_STATUSES)
