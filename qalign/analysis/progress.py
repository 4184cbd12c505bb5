"""Steps per second and time left of a run, one definition for `sweep status` and the dashboard."""

from __future__ import annotations

import datetime as dt


def utc(t: dt.datetime | None) -> dt.datetime | None:
    """`t` as an aware UTC time (SQLite hands back naive ones)."""
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=dt.UTC))


def throughput(
    done: int,
    first: dt.datetime | None,
    last: dt.datetime | None,
    extended_at: dt.datetime | None = None,
    done_at_extension: int = 0,
) -> float | None:
    """Committed steps per second between the first and last step (after an extension: since
    it); None until there are two steps to time."""
    first, last, extended_at = utc(first), utc(last), utc(extended_at)
    if first is None or last is None:
        return None
    elapsed: float | None = max((last - first).total_seconds(), 1e-9)
    if extended_at is not None:
        # The pause between the end of the first steps and the extension is no step's time.
        elapsed = (last - extended_at).total_seconds() if last > extended_at else None
        done -= done_at_extension
    return done / elapsed if elapsed and done > 1 else None


def eta(remaining: int, rate: float | None) -> float | None:
    """Seconds left at `rate` steps/s: 0 when nothing remains, None without a rate."""
    if remaining <= 0:
        return 0.0
    return remaining / rate if rate else None
