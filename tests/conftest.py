"""Shared pytest fixtures.

Database fixtures: `sqlite_url`, `pg_url` and `db_url` (parametrized over both backends) each
give a fresh, empty database URL per test. PostgreSQL is the real server on 127.0.0.1:5432
(override the maintenance connection with $QALIGN_TEST_POSTGRES_URL); each test gets its own
database `qalign_test_<random>`, dropped (WITH FORCE) afterwards. A PostgreSQL that cannot be
reached fails the tests that need it, with the reason; it is never skipped silently.

Redis: the session starts its own `redis-server` (free port, no persistence, log in the session
temp dir) and `broker` gives each test a database number no other test used, so tests never
touch the shared Redis at 6379 nor each other's keys. $QALIGN_BROKER_URL points at a closed port
for the whole session: code that forgets to take a test's broker fails instead of using 6379.

Temp files: `tests/tmpguard.py` points $TMPDIR at a session directory (removed at the end) and
reports (with QALIGN_TMP_GUARD=fail, as scripts/test.sh sets: fails) the session if something
named like ours was left in the system temp folder.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from tests import tmpguard

if TYPE_CHECKING:
    from benchmarks.chaos import PrivateRedis
    from tests.sweeps_support import Broker

# ---------------------------------------------------------------------------------------------
# Session environment: temp folder and broker
# ---------------------------------------------------------------------------------------------

# Nothing listens on port 1: a subprocess that falls back to the default broker fails fast.
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"
_guard: tmpguard.TmpGuard | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _guard
    # Before any test or fixture: tmp_path and every subprocess inherit the session TMPDIR.
    _guard = tmpguard.start()
    os.environ["QALIGN_BROKER_URL"] = UNREACHABLE_BROKER
    # Started as a background job of a non-interactive shell, pytest inherits SIGINT ignored and
    # so would every `qalign run` it starts (Python keeps an inherited SIG_IGN): a test's Ctrl-C
    # would then do nothing. A Python handler here is reset to the default in each child.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _guard
    if _guard is None:
        return
    guard, _guard = _guard, None
    ours, others = tmpguard.finish(guard)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if others and reporter is not None:
        reporter.write_line(
            f"note: new in {guard.system} during the session (not ours by name): "
            + ", ".join(others[:20])
        )
    if ours:
        strict = os.environ.get("QALIGN_TMP_GUARD") == "fail"
        if reporter is not None:
            reporter.write_line(
                f"{'FAILED' if strict else 'warning'}: {len(ours)} qalign entries appeared in "
                f"{guard.system} during the session (a leak, or another session on this "
                "machine): " + ", ".join(ours[:20]),
                red=strict,
                yellow=not strict,
            )
        if strict:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """This session's own redis-server, killed at the end."""
    from benchmarks.chaos import PrivateRedis

    rd = PrivateRedis(log=tmp_path_factory.mktemp("redis") / "redis.log", databases=4096)
    rd.start()
    try:
        yield rd
    finally:
        rd.kill()


_db_numbers = itertools.count(1)


@pytest.fixture
def broker(redis_server: PrivateRedis) -> Iterator[Broker]:
    """A Redis database of the session's server that no other test used, and a queue name."""
    from tests.sweeps_support import Broker

    # The last database is left to module-scoped workers (test_runners' celery_runner).
    b = Broker(redis_server.url, db=next(_db_numbers) % (redis_server.databases - 1))
    yield b
    b.redis.flushdb()  # the test's own database on the session's own server
    b.redis.close()


# ---------------------------------------------------------------------------------------------
# Databases
# ---------------------------------------------------------------------------------------------

PG_MAINTENANCE_URL = os.environ.get(
    "QALIGN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the PostgreSQL maintenance database (to create/drop test DBs)."""
    engine = create_engine(PG_MAINTENANCE_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        engine.dispose()
        shown = make_url(PG_MAINTENANCE_URL).render_as_string(hide_password=True)
        pytest.fail(
            f"these tests need PostgreSQL at {shown} and cannot connect: {exc.orig}. Start it "
            "(`.ci/run` does) or point $QALIGN_TEST_POSTGRES_URL at a server where this user may "
            "CREATE DATABASE.",
            pytrace=False,
        )
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped afterwards)."""
    name = f"qalign_test_{secrets.token_hex(6)}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_MAINTENANCE_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file (not created yet) in this test's tmp_path."""
    return f"sqlite:///{tmp_path / 'qalign.sqlite'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database URL; the test runs once per backend."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture(scope="module")
def toy() -> Iterator[tuple[str, str]]:
    """A toy generator ("toy-lm") and a toy reward model ("toy-rm") on free ports: their URLs."""
    from qalign.toy.server import ToyServerOptions, serve_in_thread

    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        yield g.url, r.url
