"""Where runs live on disk and where the store is, each overridable from the environment.

The store records the files of a run (its log, its checkpoints) relative to the runs folder, so
that a runs folder copied, moved or restored from a backup, database included, reads and writes
its own files and never those of the folder it was copied from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path, PurePath

RUNS_DIR_ENV = "NLMM_RUNS_DIR"
DB_URL_ENV = "NLMM_DB_URL"


def runs_dir() -> Path:
    """The folder holding the database and one sub-folder per run (`$NLMM_RUNS_DIR`, else `./runs`)."""
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs").expanduser().absolute()


def default_db_url() -> str:
    """The store's SQLAlchemy URL: `$NLMM_DB_URL`, else a SQLite file `nlmm.db` in the runs folder."""
    return os.environ.get(DB_URL_ENV) or f"sqlite:///{runs_dir() / 'nlmm.db'}"


def run_dir(run_name: str) -> Path:
    """The folder of one run: checkpoints, log file, config snapshot, search index."""
    return runs_dir() / run_name


def run_folder_of(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The run folder holding `checkpoint` (`<run>/checkpoints/<file>`); None for a checkpoint
    kept anywhere else, such as one copied out of its run."""
    folder = Path(checkpoint).parent
    return folder.parent if folder.name == "checkpoints" else None


def checkpoint_home(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the files made from a checkpoint go (its search index, weight copies, exports):
    its run's folder, else the folder the checkpoint sits in."""
    return run_folder_of(checkpoint) or Path(checkpoint).parent


def to_stored(path: str | os.PathLike[str]) -> str:
    """`path` as the store keeps it: relative to the runs folder (POSIX form) when it lies
    inside it, else absolute."""
    absolute = Path(path).expanduser().absolute()
    try:
        return absolute.relative_to(runs_dir()).as_posix()
    except ValueError:
        return str(absolute)


def from_stored(stored: str) -> str:
    """The file a stored path names now: a relative one under the current runs folder."""
    return stored if PurePath(stored).is_absolute() else str(runs_dir() / stored)


def relative_to_run(path: str, run_name: str) -> str | None:
    """An absolute path written by older nlmm, re-rooted at its run's folder (`<run>/...`), or
    None when no folder of the path is named after the run. Every run folder is named after its
    run, so the last such folder is the run's own."""
    parts = PurePath(path).parts
    if not PurePath(path).is_absolute() or run_name not in parts:
        return None
    start = len(parts) - 1 - parts[::-1].index(run_name)
    return PurePath(*parts[start:]).as_posix()


def prune_least_recent(files: Iterable[Path], keep: int) -> list[Path]:
    """Delete all but the `keep` most recently used (by mtime) of `files`; returns the deleted.
    A process that has a deleted file open or mapped keeps reading it (the inode lives on)."""
    dated = []
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            dated.append((path.stat().st_mtime_ns, path))
    removed = []
    for _, path in sorted(dated, reverse=True)[max(0, keep):]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
