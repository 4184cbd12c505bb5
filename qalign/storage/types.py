"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[dt.datetime]):
    """`DateTime(timezone=True)` that always hands back timezone-aware UTC datetimes.

    PostgreSQL (`timestamptz`) returns aware datetimes in the session's time zone; SQLite has no
    time zones and SQLAlchemy returns naive datetimes there, so `now - row.updated_at` would work
    on one backend and raise TypeError on the other. Values are converted to UTC when written
    (SQLite then stores comparable UTC strings) and marked/converted to UTC when read. Naive
    datetimes are refused on write: they are ambiguous.

    The database type is exactly `DateTime(timezone=True)`; migrations render it as such.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(
                f"naive datetime {value!r}: qalign stores timezone-aware datetimes only "
                "(use datetime.now(datetime.UTC))"
            )
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:  # SQLite: stored as UTC by process_bind_param
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


__all__ = ["UTCDateTime"]
