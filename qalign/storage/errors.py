"""Storage errors: each message says what is wrong and what to do about it.

Database URLs in messages are always redacted (no passwords).
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by `qalign.storage`."""


class InvalidDatabaseURLError(StorageError, ValueError):
    """The database URL cannot be parsed, or names a backend qalign does not support."""


class SQLiteDirectoryMissingError(StorageError):
    """The directory that should hold a SQLite database file does not exist."""

    def __init__(self, message: str, *, directory: str) -> None:
        super().__init__(message)
        self.directory = directory


class DatabaseConnectionError(StorageError):
    """The database exists in the URL but a connection cannot be opened.

    `reason` is one of "refused", "timeout", "unknown-host", "auth", "missing-database",
    "other"; `url` is redacted.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        host: str | None = None,
        port: int | None = None,
        reason: str = "other",
    ) -> None:
        super().__init__(message)
        self.url = url
        self.host = host
        self.port = port
        self.reason = reason


class DatabaseUnreachableError(DatabaseConnectionError):
    """Nothing answers at the database's host and port (refused, timed out, unknown host)."""


class MigrationsNotFoundError(StorageError):
    """The Alembic migration scripts are not where this installation expects them."""


class MigrationError(StorageError):
    """Alembic refused a migration request (e.g. an unknown target revision)."""


class SchemaNotAtHeadError(StorageError):
    """The database schema is not the one this version of qalign was written for.

    `state` is "empty" (no schema yet), "unversioned" (tables but no Alembic revision),
    "behind" (an older revision) or "ahead" (a revision unknown to this qalign: the database
    was migrated by a newer qalign). `current` is the database's revision (None when it has
    none), `head` the newest revision this qalign knows.
    """

    def __init__(self, message: str, *, state: str, current: str | None, head: str) -> None:
        super().__init__(message)
        self.state = state
        self.current = current
        self.head = head


class SQLiteFileError(StorageError):
    """The SQLite file itself is unusable: "corrupt", "not a database", "read-only" or
    "disk full". No retry fixes these, so a run stops at once; the message names the file and
    what to do, on one line.
    """

    KINDS = ("corrupt", "not a database", "read-only", "disk full")

    def __init__(self, kind: str, path: str, detail: str = "") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown SQLite file error kind {kind!r}")
        shown = f" ({detail})" if detail else ""
        advice = {
            "corrupt": (
                f"the SQLite database {path} is corrupt{shown}: restore it from a backup, or "
                f"salvage what is left with `sqlite3 {path} .recover`, then move the damaged "
                "file aside."
            ),
            "not a database": (
                f"{path} is not a SQLite database{shown}: check that --database / "
                "$QALIGN_DATABASE_URL names the right file, or move this file aside so qalign "
                "can create a new database there."
            ),
            "read-only": (
                f"the SQLite database {path} is read-only{shown}: make the file, its -wal/-shm "
                "files and its directory writable by this user, or choose another database."
            ),
            "disk full": (
                f"cannot write the SQLite database {path}: the disk is full{shown}; free space "
                "on its filesystem (or move the database elsewhere) and rerun the same command."
            ),
        }[kind]
        super().__init__(advice)
        self.kind = kind
        self.path = path


# sqlite3 primary result codes (the low byte of an extended code) that mean the file itself is
# unusable, and the text SQLite gives them (drivers that hide the code still keep the text).
_SQLITE_FILE_CODES = {11: "corrupt", 26: "not a database", 8: "read-only", 13: "disk full"}
_SQLITE_FILE_TEXTS = (
    ("database disk image is malformed", "corrupt"),
    ("file is not a database", "not a database"),
    ("readonly database", "read-only"),
    ("database or disk is full", "disk full"),
)


def sqlite_file_error(exc: BaseException, path: str) -> SQLiteFileError | None:
    """The `SQLiteFileError` that `exc` (or an error it wraps) stands for, else None."""
    import sqlite3

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, SQLiteFileError):
            return err
        if isinstance(err, sqlite3.Error):
            first = (str(err).splitlines() or [""])[0]
            code = getattr(err, "sqlite_errorcode", None)
            if isinstance(code, int) and (code & 0xFF) in _SQLITE_FILE_CODES:
                return SQLiteFileError(_SQLITE_FILE_CODES[code & 0xFF], path, first)
            for needle, kind in _SQLITE_FILE_TEXTS:
                if needle in first.lower():
                    return SQLiteFileError(kind, path, first)
        orig = getattr(err, "orig", None)
        todo.extend([orig if isinstance(orig, BaseException) else None])
        todo.extend([err.__cause__, err.__context__])
    return None


class ChainNotFoundError(StorageError, LookupError):
    """No chain of that id (e.g. a step message meant for another database)."""


__all__ = [
    "ChainNotFoundError",
    "DatabaseConnectionError",
    "DatabaseUnreachableError",
    "InvalidDatabaseURLError",
    "MigrationError",
    "MigrationsNotFoundError",
    "SQLiteDirectoryMissingError",
    "SQLiteFileError",
    "SchemaNotAtHeadError",
    "StorageError",
    "sqlite_file_error",
]


def _transient_db_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import psycopg
    from sqlalchemy import exc

    # SQLAlchemy wraps what goes through a Session; statements on a raw pooled connection raise
    # the driver's own classes. Both mean "the server went away or is restarting": retry later.
    return (
        exc.OperationalError,
        exc.InterfaceError,
        exc.TimeoutError,  # no pooled connection within the pool timeout
        psycopg.OperationalError,
        psycopg.InterfaceError,
        sqlite3.OperationalError,  # "database is locked" past the busy timeout
        DatabaseConnectionError,
    )


TRANSIENT_DB_ERRORS = _transient_db_errors()
