"""Schema versions and the migrations between them, applied at startup under a write lock.

A database without a version row is new: `create_all` builds the tables as the models define
them now and the database is stamped with the latest version. A database made by older code is
brought forward by every migration above its version, in order, in one transaction. A database
made by newer code is refused, because this code would misread tables it does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select, text, update
from sqlmodel import SQLModel

from nlmm.errors import NlmmError
from nlmm.paths import relative_to_run
from nlmm.store import models

# Any constant works; it names this application's advisory lock on PostgreSQL.
_PG_MIGRATION_LOCK_ID = 0x6E6C6D6D


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def create_tables(conn: Connection) -> None:
    """Build every table of the models that does not exist yet."""
    SQLModel.metadata.create_all(conn, tables=[m.__table__ for m in _TABLE_MODELS])


_TABLE_MODELS = (models.Run, models.Metric, models.MetricBlock, models.Checkpoint, models.SystemSample,
                 models.SchemaVersion)


def paths_relative_to_runs_folder(conn: Connection) -> None:
    """Rewrite the absolute log and checkpoint paths of older stores as `<run>/...`, relative to
    the runs folder, so that a copy of a runs folder made before this version uses its own files.

    The part of a path from the folder named after its run on is kept: the store then finds the
    run's files in whatever runs folder it is opened from. Paths without such a folder (files
    registered from elsewhere) stay absolute. Raw SQL on the text columns, since the models'
    path type would re-root the values it reads.
    """
    names = dict(conn.execute(text("SELECT id, name FROM runs")).all())
    logs = conn.execute(text("SELECT id, log_path FROM runs WHERE log_path IS NOT NULL")).all()
    for run_id, log_path in logs:
        moved = relative_to_run(log_path, names[run_id])
        if moved is not None:
            conn.execute(text("UPDATE runs SET log_path = :p WHERE id = :i"),
                         {"p": moved, "i": run_id})
    for ckpt_id, run_id, path in conn.execute(text("SELECT id, run_id, path FROM checkpoints")).all():
        moved = relative_to_run(path, names[run_id])
        if moved is not None:
            conn.execute(text("UPDATE checkpoints SET path = :p WHERE id = :i"),
                         {"p": moved, "i": ckpt_id})


def add_elapsed_before(conn: Connection) -> None:
    """runs.elapsed_before: the seconds of a run's earlier workers, so that elapsed time and ETA
    add up across resumes (0 for existing runs: only their latest worker's times are known)."""
    conn.execute(text("ALTER TABLE runs ADD COLUMN elapsed_before FLOAT NOT NULL DEFAULT 0"))


def add_phase_and_processes(conn: Connection) -> None:
    """runs.phase: what the worker is doing now (training, evaluating dev, saving a checkpoint,
    testing), so a progress bar is never silent for a minute; runs.processes: how many worker
    processes train the run (--nproc x --nnodes)."""
    conn.execute(text("ALTER TABLE runs ADD COLUMN phase VARCHAR NOT NULL DEFAULT ''"))
    conn.execute(text("ALTER TABLE runs ADD COLUMN processes INTEGER NOT NULL DEFAULT 1"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create the runs, metrics, metric_blocks, checkpoints and system_samples tables",
              create_tables),
    Migration(2, "store log and checkpoint paths relative to the runs folder",
              paths_relative_to_runs_folder),
    Migration(3, "add runs.elapsed_before", add_elapsed_before),
    Migration(4, "add runs.phase and runs.processes", add_phase_and_processes),
)
LATEST_VERSION = MIGRATIONS[-1].version


def _take_write_lock(conn: Connection) -> None:
    # SQLite transactions already start with BEGIN IMMEDIATE (see engine.py), which serialises
    # writers; PostgreSQL needs an explicit lock so that two processes do not both create tables.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_MIGRATION_LOCK_ID})


def schema_version(conn: Connection) -> int:
    """The version stamped in the database, 0 when it has none."""
    found = conn.execute(select(models.SchemaVersion.version).where(models.SchemaVersion.id == 1))
    return found.scalar_one_or_none() or 0


def migrate(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database to the latest schema version and return that version."""
    latest = migrations[-1].version
    with engine.begin() as conn:
        _take_write_lock(conn)
        models.SchemaVersion.__table__.create(conn, checkfirst=True)
        current = schema_version(conn)
        if current > latest:
            raise NlmmError(
                f"the store {engine.url.render_as_string(hide_password=True)} has schema version "
                f"{current} but this nlmm knows versions up to {latest}; upgrade nlmm or point "
                f"NLMM_DB_URL at another database")
        if current == latest:
            return latest
        if current == 0:
            create_tables(conn)
            conn.execute(insert(models.SchemaVersion).values(id=1, version=latest))
            return latest
        for migration in migrations:
            if migration.version > current:
                migration.apply(conn)
        conn.execute(update(models.SchemaVersion).where(models.SchemaVersion.id == 1)
                     .values(version=latest))
    return latest

