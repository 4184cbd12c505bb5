"""Alembic migrations, driven from code (no alembic.ini).

The migration scripts live in the top-level `migrations/` folder of the source tree, which is
installed next to the `qalign` package (as the `migrations` package) by a regular
`pip install`; `migrations_dir()` finds them beside `qalign/` in both cases.

`qalign run` calls `ensure_schema` (creates or upgrades the schema; the embedded SQLite default
just works). Workers and read-only commands call `check_schema` and refuse to start unless the
database is exactly at this qalign's head revision.

On SQLite the version read and every migration run inside one write transaction taken up front
(`BEGIN IMMEDIATE`; SQLite DDL is transactional): a second process starting on the same new file
waits for the first and then finds the finished schema, and a process killed mid-migration leaves
the file as it was. Releases before this one ran SQLite DDL in autocommit mode, so a kill could
leave the first revision's tables without a version row; `upgrade` rebuilds that half-state when
it holds no data and refuses any other inconsistent state.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, MetaData, Table, inspect, literal, select, text
from sqlalchemy import table as sql_table
from sqlalchemy.exc import DBAPIError

import qalign
from qalign.storage.engine import make_engine, open_connection, redact_url
from qalign.storage.errors import (
    MigrationError,
    MigrationsNotFoundError,
    SchemaNotAtHeadError,
)
from qalign.storage.models import Base

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

# The newest revision in migrations/versions (a test checks it against Alembic's own head).
# Knowing it without importing Alembic keeps the check every command makes cheap: importing
# Alembic costs more CPU than a `qalign sweep status` query.
HEAD = "0008_smc"

# The tables of the first revision (0001_initial), in creation order. Only these can exist without
# a version row on a SQLite file left by an interrupted migration of an older qalign: its later
# revisions ran after the first version row was written, inside that row's transaction.
FIRST_REVISION_TABLES = ("sweeps", "prompts", "runs", "chains", "prompt_encodings", "proposals")

# pg_advisory_lock key serialising concurrent `upgrade`s of one PostgreSQL database.
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"qalign-migrate").digest()[:8], "big", signed=True)


def migrations_dir() -> Path:
    """The folder holding `env.py` and `versions/` (next to the `qalign` package)."""
    folder = Path(qalign.__file__).resolve().parent.parent / "migrations"
    if not (folder / "env.py").is_file() or not (folder / "versions").is_dir():
        raise MigrationsNotFoundError(
            f"the qalign migration scripts are missing: expected {folder}/env.py and "
            f"{folder}/versions/ next to the qalign package at {Path(qalign.__file__).parent}. "
            "Reinstall qalign (pip install qalign / pip install -e <source checkout>)."
        )
    return folder


def make_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic `Config` for qalign's migrations. `env.py` uses `connection` if given, else
    `url`, else `database_url()`. Useful for Alembic commands not wrapped here, e.g.
    `alembic.command.revision(make_config(url), message="...", autogenerate=True)`.
    """
    from alembic.config import Config

    cfg = Config()
    # Config values go through configparser interpolation: escape '%'.
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    cfg.attributes["url"] = url
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _script(location: Path) -> ScriptDirectory:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(location).replace("%", "%%"))
    return ScriptDirectory.from_config(cfg)


def _script_directory() -> ScriptDirectory:
    return _script(migrations_dir())


def head_revision() -> str:
    """The newest revision this qalign knows (the schema it was written for)."""
    head = _script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships a revision
        raise MigrationsNotFoundError(f"no migration revisions in {migrations_dir()}/versions")
    return head


def _known(revision: str) -> bool:
    from alembic.script.revision import RevisionError
    from alembic.util.exc import CommandError

    try:
        return _script_directory().get_revision(revision) is not None
    except (CommandError, RevisionError):
        return False


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, or None when it has none (e.g. an empty database)."""
    with open_connection(engine) as conn:
        return _current(conn)


def _has_qalign_tables(conn: Connection) -> bool:
    names = set(inspect(conn).get_table_names())
    return bool(names & set(Base.metadata.tables))


def _schema_error(
    engine: Engine, current: str | None, unversioned: bool, repairable: bool = False
) -> SchemaNotAtHeadError:
    head = head_revision()
    where = redact_url(engine.url)
    fix = f"run `qalign db upgrade --database {where}`"
    state: str
    if current is None and unversioned and repairable:
        state = "unversioned"
        message = (
            f"database {where} holds only the empty tables of an interrupted first migration "
            f"(no Alembic revision; head: {head}); {fix} (or `qalign run`) to rebuild them."
        )
    elif current is None and unversioned:
        state = "unversioned"
        message = (
            f"database {where} has qalign tables but no Alembic revision (current: none, head: "
            f"{head}); it was not created by `qalign db upgrade`. Move it aside and {fix} on an "
            "empty database."
        )
    elif current is None:
        state = "empty"
        message = f"database {where} has no qalign schema (current: none, head: {head}); {fix}."
    elif _known(current):
        state = "behind"
        message = (
            f"database {where} has an older qalign schema (current: {current}, head: {head}); "
            f"{fix}."
        )
    else:
        state = "ahead"
        message = (
            f"database {where} was migrated by a newer qalign: its revision {current} is unknown "
            f"to this qalign (current: {current}, head: {head}). Install the newer qalign here; "
            "`qalign db upgrade` from this version cannot help."
        )
    return SchemaNotAtHeadError(message, state=state, current=current, head=head)


def check_schema(engine: Engine) -> str:
    """Return the head revision if the database is exactly at it; otherwise raise
    `SchemaNotAtHeadError` (empty, behind, ahead, or unversioned), whose message says what to do.
    """
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database).expanduser()
        if not url.query.get("uri") and not path.exists():
            # Connecting would create an empty file as a side effect of a mere check.
            raise _schema_error(engine, None, unversioned=False)
    with open_connection(engine) as conn:
        try:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        except DBAPIError:
            versions = []  # no version table: the full check below says what the database is
    if [v for (v,) in versions] == [HEAD]:
        return HEAD
    head = head_revision()
    with open_connection(engine) as conn:
        current = _current(conn)
        unversioned = current is None and _has_qalign_tables(conn)
        repairable = (
            unversioned
            and conn.dialect.name == "sqlite"
            and _abandoned_first_revision(conn) is not None
        )
    if current == head:
        return head
    raise _schema_error(engine, current, unversioned, repairable)


@contextmanager
def _engine_for(url: str | Engine) -> Iterator[Engine]:
    if isinstance(url, Engine):
        yield url
        return
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _sqlite_write_transaction(conn: Connection) -> Iterator[None]:
    """Hold SQLite's write lock (`BEGIN IMMEDIATE`) around the body; commit if it returns.

    pysqlite would run DDL in autocommit mode (it only opens transactions before DML), so the
    driver connection is put in autocommit mode and the transaction is begun explicitly (the
    recipe of SQLAlchemy's pysqlite docs, "Serializable isolation / Savepoints / Transactional
    DDL"): every CREATE, ALTER and DROP then belongs to the transaction, and a kill rolls them
    back. Waiting for another process's lock is bounded by the busy timeout.
    """
    driver = conn.connection.driver_connection
    if driver is None:  # pragma: no cover - a checked-out pysqlite connection always has one
        raise RuntimeError("no SQLite driver connection")
    # Batch migrations rebuild a table by copying it and dropping the original; with foreign
    # keys enforced that DROP would cascade into child tables and delete their rows. The pragma
    # is a no-op inside a transaction, so it is set before the transaction begins.
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    conn.commit()
    saved = driver.isolation_level
    driver.isolation_level = None
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
            conn.commit()
        except BaseException:
            # The error being raised says what went wrong; a failed rollback (e.g. the file
            # vanished) would only hide it, and SQLite discards the transaction anyway.
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
    finally:
        try:
            conn.rollback()  # a no-op after the commit above
            driver.isolation_level = saved
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()
        except Exception:
            # Never hand a connection without foreign keys (or in autocommit mode) back to the
            # pool; the error already being raised, if any, is the one worth reporting.
            conn.invalidate()


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection that alone may migrate the database: on SQLite it is inside a write
    transaction (`_sqlite_write_transaction`) that commits when the body returns; on PostgreSQL
    it is not in a transaction and holds an advisory lock, so two processes upgrading the same
    database at once run one after the other."""
    with open_connection(engine) as conn:
        if conn.dialect.name == "sqlite":
            with _sqlite_write_transaction(conn):
                yield conn
            return
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            conn.commit()
        try:
            yield conn
            conn.commit()
        finally:
            conn.rollback()
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
                conn.commit()


def _abandoned_first_revision(conn: Connection) -> list[str] | None:
    """The tables to drop when the database holds exactly what an older qalign killed during its
    first SQLite migration could leave: some of the first revision's tables, an empty or missing
    `alembic_version`, nothing else, and no rows anywhere. None for any other state."""
    names = set(inspect(conn).get_table_names())
    extra = names - set(FIRST_REVISION_TABLES) - {"alembic_version"}
    if extra or not names & set(FIRST_REVISION_TABLES):
        return None
    present = [t for t in reversed(FIRST_REVISION_TABLES) if t in names]
    if "alembic_version" in names:
        present.append("alembic_version")
    for table in present:
        if conn.execute(select(literal(1)).select_from(sql_table(table)).limit(1)).first():
            return None
    return present


def _run(engine: Engine, action: str, revision: str) -> None:
    from alembic import command
    from alembic.script.revision import RevisionError
    from alembic.util.exc import CommandError

    with _migration_connection(engine) as conn:
        sqlite = conn.dialect.name == "sqlite"
        current = _current(conn)
        if current is not None and not _known(current):
            raise _schema_error(engine, current, unversioned=False)
        if current is None and action == "upgrade" and _has_qalign_tables(conn):
            leftover = _abandoned_first_revision(conn) if sqlite else None
            if leftover is None:
                raise _schema_error(engine, current, unversioned=True)
            for table in leftover:
                Table(table, MetaData()).drop(conn)
        if not sqlite:
            # Alembic begins and commits its own transaction on a connection not inside one;
            # on SQLite it joins the write transaction held by `_migration_connection`.
            conn.commit()
        cfg = make_config(connection=conn)
        try:
            if action == "upgrade":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)
        except (CommandError, RevisionError) as exc:
            raise MigrationError(
                f"cannot {action} {redact_url(engine.url)} to {revision!r}: {exc} "
                f"(this qalign's head revision is {head_revision()})"
            ) from exc


def upgrade(url: str | Engine, revision: str = "head") -> None:
    """Migrate the database up to `revision` (default: this qalign's head). Refuses a database
    migrated by a newer qalign (`SchemaNotAtHeadError`, state "ahead")."""
    with _engine_for(url) as engine:
        _run(engine, "upgrade", revision)


def downgrade(url: str | Engine, revision: str) -> None:
    """Migrate the database down to `revision` ("base" removes every qalign table)."""
    with _engine_for(url) as engine:
        _run(engine, "downgrade", revision)


def ensure_schema(url: str | Engine) -> str:
    """Bring an empty or older database to head (what `qalign run` does) and return the head
    revision. A database migrated by a newer qalign, or holding tables without a revision,
    raises `SchemaNotAtHeadError` (except the empty half-state an interrupted SQLite migration
    of an older qalign left, which `upgrade` rebuilds)."""
    with _engine_for(url) as engine:
        try:
            return check_schema(engine)
        except SchemaNotAtHeadError as exc:
            # "unversioned" too: `upgrade` decides under the write lock whether it is the
            # repairable half-state, and raises the same error otherwise.
            if exc.state not in ("empty", "behind", "unversioned"):
                raise
        upgrade(engine)
        return check_schema(engine)


__all__ = [
    "check_schema",
    "current_revision",
    "downgrade",
    "ensure_schema",
    "head_revision",
    "make_config",
    "migrations_dir",
    "upgrade",
]
