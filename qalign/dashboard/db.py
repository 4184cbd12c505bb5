"""Read-only engines: the dashboard can look at a live database but never change it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from qalign.storage.engine import (
    SQLITE_BUSY_PRAGMA,
    SQLITE_BUSY_TIMEOUT_MS,
    normalize_url,
    redact_url,
    sqlite_path,
)
from qalign.storage.errors import DatabaseConnectionError

# Read-only on PostgreSQL: every transaction of the session starts READ ONLY, so a stray write
# fails in the server (`cannot execute INSERT in a read-only transaction`).
PG_READ_ONLY = "-c default_transaction_read_only=on"


def readonly_engine(url: str) -> Engine:
    """An engine on `url` (SQLite or PostgreSQL) through which every write fails."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path == ":memory:" or not Path(path).expanduser().is_file():
            raise DatabaseConnectionError(
                f"no SQLite database at {path!r}: the dashboard only reads an existing database "
                "(create one with `qalign run` or `qalign db upgrade`, or pass --database)",
                url=redact_url(parsed),
                reason="other",
            )
        uri = "file:" + quote(str(Path(path).expanduser().absolute())) + "?mode=ro"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(
                uri, uri=True, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000
            )

        # The URL keeps `uri=true` so the schema check reads the path the way we opened it.
        engine = create_engine(
            "sqlite:///" + uri + "&uri=true", creator=connect, pool_size=8, max_overflow=8
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    connect_args: dict[str, Any] = {
        "options": PG_READ_ONLY,
        "connect_timeout": 10,
        "application_name": "qalign-dashboard",
    }
    return create_engine(
        parsed, connect_args=connect_args, pool_size=8, max_overflow=8, pool_pre_ping=True
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(SQLITE_BUSY_PRAGMA)
        cursor.execute("PRAGMA query_only=ON")  # belt and braces beside mode=ro
    finally:
        cursor.close()
