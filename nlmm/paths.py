"""Where runs live on disk and where the store is, each overridable from the environment."""

from __future__ import annotations

import os
from pathlib import Path

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
