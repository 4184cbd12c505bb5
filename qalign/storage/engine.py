"""Database URLs, engines and sessions for SQLite (the embedded default) and PostgreSQL.

`database_url()` picks the URL (explicit argument, else `$QALIGN_DATABASE_URL`, else
`qalign.sqlite` in the current directory); `make_engine()` builds an engine whose pool suits a
worker running ~32 threads; `open_connection()` connects and turns "cannot connect" into a
`DatabaseConnectionError` naming host and port. URLs shown to people go through `redact_url()`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import tenacity
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

from qalign.storage.errors import (
    DatabaseConnectionError,
    DatabaseUnreachableError,
    InvalidDatabaseURLError,
    SQLiteDirectoryMissingError,
    sqlite_file_error,
)

ENV_DATABASE_URL = "QALIGN_DATABASE_URL"
ENV_POOL_SIZE = "QALIGN_DB_POOL_SIZE"
ENV_MAX_OVERFLOW = "QALIGN_DB_MAX_OVERFLOW"

DEFAULT_SQLITE_FILE = "qalign.sqlite"
DEFAULT_POOL_SIZE = 32
DEFAULT_MAX_OVERFLOW = 8
POOL_TIMEOUT_S = 30.0
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_EXAMPLES = "e.g. sqlite:///path/to/qalign.sqlite or postgresql://user:password@host:5432/dbname"

# JSON columns hold token ids, messages and configs. Refuse NaN/Infinity in them on every backend:
# PostgreSQL's json type rejects them anyway, and SQLite would silently store non-standard JSON.
_json_dumps = functools.partial(json.dumps, allow_nan=False)


def _redact_unparsed(url: str) -> str:
    """Hide the password of a URL that SQLAlchemy could not parse."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


def redact_url(url: str | URL) -> str:
    """The URL with its password replaced by `***` (safe to print or log)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return _redact_unparsed(str(url))


def redact_password(text: str, url: str | URL) -> str:
    """`text` (e.g. a driver's error message) with the password of `url` replaced by `***`."""
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        return text
    return text.replace(str(password), "***") if password else text


def _parse(url: str | URL) -> URL:
    """Parse, normalise `postgres[ql]://` to psycopg 3, and check the backend is supported."""
    if isinstance(url, str) and not url.strip():
        raise InvalidDatabaseURLError(f"the database URL is empty; expected {_EXAMPLES}")
    try:
        parsed = make_url(url.strip() if isinstance(url, str) else url)
    except (ArgumentError, ValueError) as exc:
        raise InvalidDatabaseURLError(
            f"malformed database URL {_redact_unparsed(str(url))!r} ({exc}); expected {_EXAMPLES}"
        ) from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend not in SUPPORTED_BACKENDS:
        raise InvalidDatabaseURLError(
            f"unsupported database backend {parsed.drivername!r} in {redact_url(parsed)!r}: "
            f"qalign supports SQLite and PostgreSQL ({_EXAMPLES})"
        )
    if backend == "postgresql" and not driver:
        driver = "psycopg"
    drivername = f"{backend}+{driver}" if driver else backend
    return parsed if drivername == parsed.drivername else parsed.set(drivername=drivername)


def normalize_url(url: str | URL) -> str:
    """`url` validated, with `postgresql://` and `postgres://` turned into `postgresql+psycopg://`
    (everything else is returned unchanged)."""
    parsed = _parse(url)
    if isinstance(url, str) and parsed.drivername == make_url(url.strip()).drivername:
        return url.strip()
    return parsed.render_as_string(hide_password=False)


def database_url(explicit: str | None = None) -> str:
    """The database to use: `explicit` if given, else `$QALIGN_DATABASE_URL`, else the SQLite
    file `qalign.sqlite` in the current directory (as an absolute path, so it keeps naming the
    same file if the process changes directory). The result is normalised (`normalize_url`);
    an empty string counts as not given.
    """
    for candidate in (explicit, os.environ.get(ENV_DATABASE_URL)):
        if candidate is not None and candidate.strip():
            return normalize_url(candidate)
    # URL.create quotes characters such as "?" that would otherwise end the path.
    return URL.create("sqlite", database=str(Path.cwd() / DEFAULT_SQLITE_FILE)).render_as_string()


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"${name}={value} must be at least {minimum}")
    return value


def _is_sqlite_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _check_sqlite_directory(url: URL) -> None:
    if _is_sqlite_memory(url) or url.query.get("uri") or url.database is None:
        return
    path = Path(url.database).expanduser()
    directory = path.parent.absolute()
    if not directory.is_dir():
        raise SQLiteDirectoryMissingError(
            f"cannot create the SQLite database {str(path)!r}: the directory {str(directory)!r} "
            f"does not exist. Create it (mkdir -p {directory}) or choose another database "
            f"with --database or ${ENV_DATABASE_URL}.",
            directory=str(directory),
        )
    if path.is_dir():
        raise SQLiteDirectoryMissingError(
            f"the SQLite database path {str(path)!r} is a directory; name a file inside it, "
            f"e.g. sqlite:///{path / DEFAULT_SQLITE_FILE}",
            directory=str(path),
        )


# Built once from a constant: statements are never assembled from runtime values.
SQLITE_BUSY_PRAGMA = "PRAGMA busy_timeout=" + str(int(SQLITE_BUSY_TIMEOUT_MS))


def _sqlite_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "database is locked" in str(exc) or "database is busy" in str(exc)
    )


# Two connections switching one new file to WAL at once each read page 1 and then try to upgrade
# to a write lock; SQLite refuses the second upgrade at once (it would deadlock) without calling
# the busy handler, so busy_timeout does not cover it. Retried here within the same time budget.
@tenacity.retry(
    retry=tenacity.retry_if_exception(_sqlite_busy),
    wait=tenacity.wait_random_exponential(multiplier=0.005, max=0.2),
    stop=tenacity.stop_after_delay(SQLITE_BUSY_TIMEOUT_MS / 1000),
    reraise=True,
)
def _switch_to_wal(cursor: Any) -> None:
    cursor.execute("PRAGMA journal_mode=WAL")  # in-memory databases answer "memory"


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching a fresh file to WAL may have to wait for another connection.
        cursor.execute(SQLITE_BUSY_PRAGMA)
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def sqlite_path(url: str | URL) -> str:
    """The file a SQLite URL names, as a person would type it (a `file:` URI's path part)."""
    parsed = make_url(url) if isinstance(url, str) else url
    database = parsed.database or ":memory:"
    if parsed.query.get("uri") and database.startswith("file:"):
        database = database.removeprefix("file:").split("?", 1)[0]
    return database


def _sqlite_file_errors(engine: Engine) -> None:
    """Turn "the file itself is unusable" errors (corrupt, not a database, read-only, disk full)
    into `SQLiteFileError` wherever a statement or a connect fails, so every caller (a CLI
    command, a migration, the step service) reports the file and the fix instead of a driver
    traceback."""
    path = sqlite_path(engine.url)

    def handle_error(context: ExceptionContext) -> None:
        error = sqlite_file_error(context.original_exception, path)
        if error is not None:
            raise error from context.original_exception

    event.listen(engine, "handle_error", handle_error)


# A pooled PostgreSQL connection idle for longer than this is pinged before use. A busy worker
# reuses its connections within milliseconds, and a ping on every checkout (SQLAlchemy's
# `pool_pre_ping`) cost as much CPU as the step's own statements; a connection that dies while
# in use is handled where it is used (the step's statements reconnect once, `hotpath`).
PING_AFTER_IDLE_S = 2.0


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    since = record.info.get("idle_since")
    if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
        return
    import psycopg

    try:
        with dbapi_connection.cursor() as cur:
            cur.execute("SELECT 1")
        dbapi_connection.rollback()
    except psycopg.Error as exc:
        # The pool discards this connection and checks out (or opens) another one.
        raise DisconnectionError(f"stale pooled connection: {exc}") from exc


def make_engine(
    url: str | URL,
    *,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    pool_timeout: float = POOL_TIMEOUT_S,
    echo: bool = False,
) -> Engine:
    """An engine for `url` (SQLite or PostgreSQL; `postgresql://` uses psycopg 3).

    Pool: `pool_size` connections kept (default `$QALIGN_DB_POOL_SIZE`, else 32) plus up to
    `max_overflow` extra ones (default `$QALIGN_DB_MAX_OVERFLOW`, else 8), so a worker's thread
    pool of ~32 threads never waits for a connection. Connections are opened lazily.

    SQLite: every connection gets WAL journaling, `busy_timeout` 30 s, `synchronous=NORMAL` and
    foreign keys ON (which `ON DELETE CASCADE` needs); connections may move between threads. An
    in-memory database uses one shared connection (a pool would give each connection its own
    empty database). PostgreSQL: connections idle for 2 s are pinged before use, a 10 s connect
    timeout.

    The engine is lazy: a wrong host or password shows up at the first connection (use
    `open_connection` for a clear error). A SQLite file whose directory is missing is reported
    here (`SQLiteDirectoryMissingError`); a malformed or unsupported URL raises
    `InvalidDatabaseURLError`.
    """
    parsed = _parse(url)
    size = pool_size if pool_size is not None else _env_int(ENV_POOL_SIZE, DEFAULT_POOL_SIZE, 1)
    overflow = (
        max_overflow
        if max_overflow is not None
        else _env_int(ENV_MAX_OVERFLOW, DEFAULT_MAX_OVERFLOW, 0)
    )
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _json_dumps}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _check_sqlite_directory(parsed)
        kwargs["connect_args"] = {
            "check_same_thread": False,
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
        }
        if _is_sqlite_memory(parsed):
            kwargs["poolclass"] = StaticPool
        else:
            kwargs.update(
                poolclass=QueuePool,
                pool_size=size,
                max_overflow=overflow,
                pool_timeout=pool_timeout,
            )
    else:
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        if "application_name" not in parsed.query:
            connect_args["application_name"] = "qalign"
        kwargs.update(
            connect_args=connect_args,
            pool_size=size,
            max_overflow=overflow,
            pool_timeout=pool_timeout,
        )
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise InvalidDatabaseURLError(
            f"cannot use the database driver {parsed.drivername!r} of {redact_url(parsed)!r} "
            f"({exc}); qalign ships psycopg 3: use postgresql://... or postgresql+psycopg://..."
        ) from exc
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        _sqlite_file_errors(engine)
    else:
        event.listen(engine, "checkin", _note_checkin)
        event.listen(engine, "checkout", _ping_if_idle)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`; objects stay readable after commit (`expire_on_commit=False`)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


_REASONS: tuple[tuple[str, str, str], ...] = (
    # (substring of the driver's message, reason, advice)
    ("connection refused", "refused", "is the server running and listening on that host/port?"),
    ("timeout expired", "timeout", "is the host reachable (firewall, network)?"),
    ("timed out", "timeout", "is the host reachable (firewall, network)?"),
    ("could not translate host name", "unknown-host", "check the host name in the URL."),
    ("name or service not known", "unknown-host", "check the host name in the URL."),
    ("nodename nor servname", "unknown-host", "check the host name in the URL."),
    ("password authentication failed", "auth", "check the user name and password in the URL."),
    ("no password supplied", "auth", "put the password in the URL (user:password@host)."),
    ("no pg_hba.conf entry", "auth", "the server's pg_hba.conf does not admit this client."),
    ("role ", "auth", "check the user name in the URL."),
)
_UNREACHABLE = {"refused", "timeout", "unknown-host"}


def _connection_error(url: URL, exc: BaseException) -> DatabaseConnectionError:
    shown = redact_url(url)
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    message = redact_password(" ".join(line.strip() for line in detail[:2]), url)
    if url.get_backend_name() == "sqlite":
        return DatabaseConnectionError(
            f"cannot open the SQLite database {url.database!r} ({message}); check that the file "
            "is readable and writable and its directory writable.",
            url=shown,
            reason="other",
        )
    host = url.host or "localhost (Unix socket)"
    port = url.port or 5432
    lowered = message.lower()
    if "database" in lowered and "does not exist" in lowered:
        return DatabaseConnectionError(
            f"PostgreSQL at {host}:{port} has no database {url.database!r} ({shown}). Create it "
            f"first, e.g. psql -h {url.host or 'localhost'} -p {port} -c "
            f"'CREATE DATABASE \"{url.database}\"', or fix the database name in the URL.",
            url=shown,
            host=url.host,
            port=port,
            reason="missing-database",
        )
    reason, advice = "other", "check the URL and that the server accepts connections."
    for needle, why, hint in _REASONS:
        if needle in lowered:
            reason, advice = why, hint
            break
    cls = DatabaseUnreachableError if reason in _UNREACHABLE else DatabaseConnectionError
    return cls(
        f"cannot connect to PostgreSQL at {host}:{port} ({shown}): {message}. {advice} "
        f"Choose the database with --database or ${ENV_DATABASE_URL}.",
        url=shown,
        host=url.host,
        port=port,
        reason=reason,
    )


def open_connection(engine: Engine) -> Connection:
    """`engine.connect()`, with "cannot connect at all" turned into `DatabaseConnectionError`
    (`DatabaseUnreachableError` when nothing answers at the host and port). Errors after the
    connection is open are left alone.
    """
    try:
        return engine.connect()
    except DBAPIError as exc:
        raise _connection_error(engine.url, exc) from exc


def ping(engine: Engine) -> None:
    """Open a connection and run `SELECT 1`; raises `DatabaseConnectionError` on failure."""
    with open_connection(engine) as conn:
        conn.exec_driver_sql("SELECT 1")


__all__ = [
    "DEFAULT_MAX_OVERFLOW",
    "DEFAULT_POOL_SIZE",
    "ENV_DATABASE_URL",
    "ENV_MAX_OVERFLOW",
    "ENV_POOL_SIZE",
    "database_url",
    "make_engine",
    "make_sessionmaker",
    "normalize_url",
    "open_connection",
    "ping",
    "redact_url",
    "sqlite_path",
]
