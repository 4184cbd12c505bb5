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
    "SchemaNotAtHeadError",
    "StorageError",
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
