"""Engines and sessions for the store, safe to share between the CLI, the worker and the dashboard.

SQLite is set up for several processes at once: WAL (readers never block the writer), a 30 s
busy timeout, and BEGIN IMMEDIATE for write transactions, so a writer takes the lock up front
instead of failing with "database is locked" when it upgrades a read lock. Read sessions begin
with a plain (deferred) BEGIN so the dashboard's polling never queues behind the worker.

PostgreSQL (`NLMM_DB_URL=postgresql://user:password@host/db`, for several nodes logging to one
server) needs no such setup: its row locks let writers of different runs proceed side by side.
A URL without a driver uses psycopg 3 (`pip install nlmm[postgres]`) rather than SQLAlchemy's
default psycopg2.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError, OperationalError
from sqlmodel import Session

from nlmm.errors import NlmmError
from nlmm.paths import default_db_url
from nlmm.store.migrations import migrate

BUSY_TIMEOUT_S = 30
_READ_ONLY = "nlmm_read_only"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _forget_engines_in_child() -> None:
    # Pooled connections must never cross a fork: the child drops them without closing them under
    # the parent, and starts with a fresh lock in case a parent thread held it at fork time.
    global _engines_lock
    _engines_lock = threading.Lock()
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for other backends and in-memory databases."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:" \
            or url.database.startswith("file:"):
        return None
    return Path(url.database).expanduser()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below (the SQLAlchemy recipe for pysqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(_READ_ONLY)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _with_driver(url: URL) -> URL:
    """`postgresql://` means psycopg 3 here, the driver nlmm depends on for PostgreSQL."""
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def create_store_engine(url: str) -> Engine:
    """A new engine for `url`, configured for concurrent use; no schema work, no caching."""
    shown = url
    try:
        parsed = _with_driver(make_url(url))
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite":
            database = _sqlite_file(parsed)
            if database is not None:
                database.parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S,
                                                         "check_same_thread": False})
            _configure_sqlite(engine)
            return engine
        return create_engine(parsed, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ModuleNotFoundError) as exc:
        hint = " (for PostgreSQL: pip install 'psycopg[binary]')" if "psycopg" in str(exc) else ""
        raise NlmmError(f"cannot use the database URL {shown} ({exc}); fix NLMM_DB_URL or install "
                        f"its driver{hint}") from exc
    except OSError as exc:
        raise NlmmError(f"cannot create the folder of the database {shown} ({exc}); set NLMM_RUNS_DIR "
                        f"or NLMM_DB_URL to a writable place") from exc


def current_url() -> str:
    """The URL `get_engine()` opens by default, with a relative SQLite path made absolute, so
    that a child process started in another folder (NLMM_DB_URL=current_url()) opens the same store."""
    url = make_url(default_db_url())
    database = _sqlite_file(url)
    if database is not None:
        url = url.set(database=str(database.absolute()))
    return url.render_as_string(hide_password=False)


def get_engine(url: str | None = None) -> Engine:
    """The process's engine for `url` (default: `current_url()`), its schema migrated on first use.

    Cached per URL; a child made by fork opens its own instead of sharing the parent's.
    """
    url = url or current_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        engine = create_store_engine(url)
        try:
            migrate(engine)
        except OperationalError as exc:
            engine.dispose()
            if engine.dialect.name == "sqlite":
                advice = ("check that its folder is writable and on a local disk (SQLite WAL does "
                          "not work on network file systems)")
            else:
                advice = "check that the server is running and reachable and the login is right"
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise NlmmError(f"cannot open the store {engine.url.render_as_string(hide_password=True)} "
                            f"({reason}); {advice}") from exc
        except DatabaseError as exc:
            engine.dispose()
            database = _sqlite_file(engine.url)
            if database is None:
                raise
            # SQLite's "file is not a database": something else sits at the store's path
            raise NlmmError(f"the store file {database} is not an SQLite database; move it away "
                            f"(nlmm then starts a new store there) or point NLMM_RUNS_DIR or "
                            f"NLMM_DB_URL at another store") from exc
        except BaseException:
            engine.dispose()
            raise
        _engines[url] = engine
        return engine


@contextmanager
def read_session(engine: Engine | None = None) -> Iterator[Session]:
    """A session for queries; objects stay usable after it closes."""
    engine = engine or get_engine()
    with Session(engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False) as session:
        yield session


@contextmanager
def write_session(engine: Engine | None = None) -> Iterator[Session]:
    """A session whose work commits as one transaction on leaving the block (rolls back on error)."""
    engine = engine or get_engine()
    with Session(engine, expire_on_commit=False) as session:
        yield session
        session.commit()
