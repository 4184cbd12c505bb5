"""The two statements every step runs, at the driver level.

A step reads one chain row and later commits one proposal plus the chain's new state. Through
the ORM those two transactions cost more CPU than the rest of the step (session set-up, cache
keys, compilation, result processing), so they are written here as fixed SQL strings executed on
the pooled DBAPI connection. Everything else in `repo` keeps using SQLAlchemy.

The commit decides `done` from the row's own `target_steps`, not from what the step read
earlier: a `qalign sweep extend` that raised the target meanwhile leaves the chain running.

PostgreSQL commits a step with one statement (the compare-and-set UPDATE feeds the INSERT
through a CTE, so the proposal exists iff the chain moved): alone in autocommit mode, one round
trip; several steps pipelined in one transaction. Reads run in autocommit mode. SQLite takes
the write lock up front (`BEGIN IMMEDIATE`) so concurrent committers queue on the busy timeout
instead of failing to upgrade a read lock.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import Engine


def _dumps(value: Any) -> str:
    # compact, and fast: token lists are most of a proposal's bytes and of a step's JSON work
    return orjson.dumps(value).decode()


_CHAIN_SQL = (
    "SELECT run_id, prompt_id, rng_key, seed, target_steps, current_step, status, attempts, "
    "state_tokens, state_logprobs, state_reward, state_finish, state_text, updated_at "
    "FROM chains WHERE id = %(id)s"
)
_PROPOSAL_COLUMNS = (
    "chain_id", "run_id", "step", "cut", "new_tokens", "response_len", "text", "reward",
    "log_a", "alpha", "accepted", "finish", "reject_reason", "gen_seed", "gen_tokens",
    "reward_tokens", "gen_latency_ms", "reward_latency_ms", "endpoint", "worker", "created_at",
    "reward_terms", "generator_seconds", "reward_seconds", "queue_seconds", "log_weight",
)  # fmt: skip
_JSON_PARAMS = ("new_tokens", "state_tokens", "state_logprobs", "reward_terms")
_UPDATE_SQL = (
    "UPDATE chains SET current_step = %(step)s, state_tokens = %(state_tokens)s{json}, "
    "state_logprobs = %(state_logprobs)s{json}, state_reward = %(state_reward)s, "
    "state_finish = %(state_finish)s, state_text = %(state_text)s, "
    "status = CASE WHEN target_steps <= %(step)s THEN 'done' ELSE 'running' END, "
    "attempts = 0, last_error = NULL, updated_at = %(created_at)s, "
    "accepted_steps = accepted_steps + %(accepted_inc)s, "
    "rejected_with_reason = rejected_with_reason + %(rejected_inc)s, "
    "first_step_at = COALESCE(first_step_at, %(created_at)s), last_step_at = %(created_at)s "
    "WHERE id = %(chain_id)s AND current_step = %(prev)s "
    "AND status NOT IN ('done', 'failed', 'cancelled', 'converged')"
)


def _param(col: str, pg: bool) -> str:
    return f"%({col})s::json" if pg and col in _JSON_PARAMS else f"%({col})s"


def _sqlite(sql: str) -> str:
    """psycopg's `%(name)s` placeholders as sqlite3's `:name`."""
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


_PG_COMMIT = (
    "WITH moved AS (" + _UPDATE_SQL.format(json="::json") + " RETURNING id, target_steps) "
    f"INSERT INTO proposals ({', '.join(_PROPOSAL_COLUMNS)}) "
    f"SELECT {', '.join(_param(c, True) for c in _PROPOSAL_COLUMNS)} FROM moved "
    "RETURNING (SELECT target_steps FROM moved)"
)
_SQLITE_UPDATE = _sqlite(_UPDATE_SQL.format(json="") + " RETURNING target_steps")
_SQLITE_INSERT = _sqlite(
    f"INSERT INTO proposals ({', '.join(_PROPOSAL_COLUMNS)}) "
    f"VALUES ({', '.join(_param(c, False) for c in _PROPOSAL_COLUMNS)})"
)
_SQLITE_CHAIN = _sqlite(_CHAIN_SQL)


def _sqlite_time(t: dt.datetime) -> str:
    # The layout SQLAlchemy's SQLite DateTime stores (UTC, no offset), so both paths sort alike.
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@contextmanager
def _autocommit(conn: Any) -> Iterator[None]:
    """One statement, one round trip: no BEGIN/COMMIT around it. Restored before the connection
    goes back to the pool, where SQLAlchemy expects transactions."""
    driver = conn.driver_connection
    driver.autocommit = True
    try:
        yield
    finally:
        if not driver.broken:
            driver.autocommit = False


def _pg_one(engine: Engine, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """Run one statement in autocommit mode and return its first row.

    A pooled connection that turns out dead (the server restarted since it was last used) is
    dropped and the statement runs once more on a fresh one. For the commit that is safe even if
    the first attempt did reach the server: the compare-and-set makes the second one a no-op.
    """
    import psycopg

    for attempt in (1, 2):
        conn = engine.raw_connection()
        try:
            with _autocommit(conn):
                cur = conn.cursor()
                cur.execute(sql, params)
                row = cur.fetchone()
                return None if row is None else tuple(row)
        except psycopg.OperationalError:
            if attempt == 2 or not getattr(conn.driver_connection, "broken", False):
                raise
            conn.invalidate()
        finally:
            conn.close()
    raise AssertionError("unreachable")  # pragma: no cover


def read_chain(engine: Engine, chain_id: int) -> tuple[Any, ...] | None:
    """The chain's row (see `_CHAIN_SQL`), JSON columns decoded; None if there is no such chain."""
    if engine.dialect.name == "postgresql":
        return _pg_one(engine, _CHAIN_SQL, {"id": chain_id})
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        cur.execute(_SQLITE_CHAIN, {"id": chain_id})
        found = cur.fetchone()
        conn.rollback()
    finally:
        conn.close()
    if found is None:
        return None
    row = list(found)
    for i in (8, 9):  # state_tokens, state_logprobs: JSON text in SQLite
        if isinstance(row[i], str):
            row[i] = orjson.loads(row[i])
    if isinstance(row[13], str):  # stored by SQLAlchemy's SQLite DateTime: UTC, no offset
        row[13] = dt.datetime.fromisoformat(row[13]).replace(tzinfo=dt.UTC)
    return tuple(row)


def _encoded(params: dict[str, Any], sqlite: bool) -> dict[str, Any]:
    p = dict(params)
    p["accepted_inc"] = int(p["step"] > 0 and bool(p["accepted"]))
    p["rejected_inc"] = int(p["reject_reason"] is not None)
    for key in _JSON_PARAMS:
        if p[key] is not None:
            p[key] = _dumps(p[key])
    if sqlite:
        p["created_at"] = _sqlite_time(p["created_at"])
    return p


def commit_many_sqlite(engine: Engine, batch: list[dict[str, Any]]) -> list[int | None]:
    """`commit` for several steps (of different chains) in one SQLite transaction.

    Each step is still its own compare-and-set: a step whose chain is not at `prev` changes
    nothing and gets None, the others commit. One transaction instead of one per step is what
    the embedded runner gains: SQLite's cost per commit (the lock, the WAL frames of the pages
    it touched) is most of a step's SQL, and steps committed together share their pages. A
    proposal that exists without its chain having moved (never, in practice) makes the whole
    batch go again one step at a time, so that step alone is refused.
    """
    import sqlite3

    encoded = [_encoded(p, sqlite=True) for p in batch]
    out: list[int | None] = []
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            for p in encoded:
                moved = cur.execute(_SQLITE_UPDATE, p).fetchone()
                if moved is not None:
                    cur.execute(_SQLITE_INSERT, p)
                out.append(None if moved is None else int(moved[0]))
            conn.commit()
        except sqlite3.IntegrityError:
            conn.rollback()
            out = []
        except BaseException:
            conn.rollback()
            raise
    finally:
        conn.close()
    if len(out) == len(batch):
        return out
    return [commit(engine, p) for p in batch]


def commit_many_pg(engine: Engine, batch: list[dict[str, Any]]) -> list[int | None]:
    """`commit` for several steps (of different chains) in one PostgreSQL transaction.

    Each step is still its own compare-and-set statement: a step whose chain is not at `prev`
    changes nothing and gets None, the others commit. The statements go out pipelined and the
    transaction commits once, so a batch costs one round trip and one WAL flush instead of one
    of each per step (sequential flushes on one connection were most of a step's wall time). A
    proposal that exists without its chain having moved (never, in practice) aborts the
    transaction; the batch then goes again one step at a time, so that step alone is refused.
    A connection found dead is replaced once and the batch runs again (safe: the
    compare-and-set).
    """
    import psycopg

    encoded = [_encoded(p, sqlite=False) for p in batch]
    if len(encoded) == 1:
        return [_commit_pg_alone(engine, encoded[0])]
    for attempt in (1, 2):
        conn = engine.raw_connection()
        try:
            driver: Any = conn.driver_connection
            cur = driver.cursor()  # psycopg's own, for executemany(returning=True)
            try:
                cur.executemany(_PG_COMMIT, encoded, returning=True)
                out: list[int | None] = []
                while True:
                    row = cur.fetchone()
                    out.append(None if row is None else int(row[0]))
                    if not cur.nextset():
                        break
                conn.commit()
            except psycopg.IntegrityError:
                conn.rollback()
                break
            except BaseException:
                if not getattr(conn.driver_connection, "broken", False):
                    conn.rollback()
                raise
            if len(out) != len(encoded):  # pragma: no cover - psycopg returns one set per row
                raise RuntimeError(f"{len(out)} results for a batch of {len(encoded)} steps")
            return out
        except psycopg.OperationalError:
            if attempt == 2 or not getattr(conn.driver_connection, "broken", False):
                raise
            conn.invalidate()
        finally:
            conn.close()
    return [_commit_pg_alone(engine, p) for p in encoded]


def _commit_pg_alone(engine: Engine, p: dict[str, Any]) -> int | None:
    """One encoded step's compare-and-set in autocommit mode (one round trip)."""
    import psycopg

    try:
        row = _pg_one(engine, _PG_COMMIT, p)
    except psycopg.IntegrityError:
        return None
    return None if row is None else int(row[0])


def commit(engine: Engine, params: dict[str, Any]) -> int | None:
    """Move the chain from `prev` to `step` and insert its proposal, atomically.

    Returns the chain's stored `target_steps` as the move saw it (so the caller knows whether
    the step was the last without another read), or None (and changes nothing) when the chain
    is not at `prev` or is finished, or when a proposal for (chain, step) exists. `params` holds
    every proposal column plus the chain's new state; list values of the JSON columns are
    encoded here.
    """
    if engine.dialect.name == "postgresql":
        return commit_many_pg(engine, [params])[0]
    p = _encoded(params, sqlite=True)
    conn = engine.raw_connection()
    try:
        import sqlite3

        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            moved = cur.execute(_SQLITE_UPDATE, p).fetchone()
            if moved is None:
                conn.rollback()
                return None
            cur.execute(_SQLITE_INSERT, p)
            conn.commit()
            return int(moved[0])
        except sqlite3.IntegrityError:
            conn.rollback()
            return None
        except BaseException:
            conn.rollback()
            raise
    finally:
        conn.close()
