"""The runs table of a SQLite store read through the standard library's sqlite3, for `nlmm runs
ls`, which must answer at once: importing SQLAlchemy and SQLModel alone takes 0.3 s.

It only reads, and only answers when it can answer exactly as the store would: the default kind
of store (a SQLite file) that exists and is at the schema version this code writes, with no run
due for the sweep that marks dead workers lost (`mark_lost` writes, so it stays with the store).
Otherwise `read_runs` returns None and the caller goes through nlmm.store.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

from nlmm.paths import default_db_url, from_stored
from nlmm.store.liveness import is_lost
from nlmm.store.status import RunStatus

# nlmm.store.migrations.LATEST_VERSION, which imports SQLAlchemy; a test keeps the two equal.
# A store at any other version is read through nlmm.store, which migrates or refuses it.
SCHEMA_VERSION = 4
_SQLITE_PREFIX = "sqlite:///"
# Columns the store's models convert on reading (nlmm.store.models.RunsPath).
_PATH_COLUMNS = ("log_path",)


def store_file() -> Path | None:
    """The SQLite file of the store nlmm opens by default, when it is a plain file path."""
    url = default_db_url()
    database = url[len(_SQLITE_PREFIX):]
    # Anything SQLAlchemy would parse further (query options, escapes, in-memory) is left to it.
    if not url.startswith(_SQLITE_PREFIX) or not database or any(c in database for c in "?%") \
            or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def read_runs(status: str | None = None) -> list[SimpleNamespace] | None:
    """The runs newest first, as `nlmm.store.list_runs(status)` returns them after `mark_lost()`
    (each row has the attributes of a store.Run); None when only the store can answer."""
    database = store_file()
    if database is None or not database.is_file():
        return None
    if status is not None and status not in RunStatus.__members__.values():
        return None
    try:
        # mode=rw: never create a file that vanished since the check above
        with closing(sqlite3.connect(f"{database.absolute().as_uri()}?mode=rw", uri=True,
                                     timeout=30)) as connection:
            version = connection.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
            if version is None or version[0] != SCHEMA_VERSION:
                return None
            cursor = connection.execute("SELECT * FROM runs ORDER BY created_at DESC, id DESC")
            columns = [column[0] for column in cursor.description]
            rows = [SimpleNamespace(**dict(zip(columns, row))) for row in cursor]
    except sqlite3.Error:
        return None  # not a database, locked for 30 s, damaged: the store says what to do
    now = time.time()
    if any(is_lost(row, now) for row in rows):  # over all runs, as the sweep is
        return None
    rows = [row for row in rows if status is None or row.status == status]
    for row in rows:
        for column in _PATH_COLUMNS:
            value = getattr(row, column)
            setattr(row, column, None if value is None else from_stored(value))
    return rows
