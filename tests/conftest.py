"""Shared pytest fixtures.

Database fixtures: `sqlite_url`, `pg_url` and `db_url` (parametrized over both backends) each
give a fresh, empty database URL per test. PostgreSQL is the real server on 127.0.0.1:5432
(override the maintenance connection with $QALIGN_TEST_POSTGRES_URL); each test gets its own
database `qalign_test_<random>`, dropped (WITH FORCE) afterwards. A PostgreSQL that cannot be
reached fails the tests that need it, with the reason; it is never skipped silently.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

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
