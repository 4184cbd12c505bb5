"""Alembic environment for qalign, configured from code by `qalign.storage.migrate`.

The database comes from the Alembic config's attributes: an open `connection` (what
`qalign.storage.migrate` passes), else a `url`, else `qalign.storage.engine.database_url()`
(`$QALIGN_DATABASE_URL`, else ./qalign.sqlite).
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection
from sqlalchemy.types import TypeDecorator

from qalign.storage.engine import database_url, make_engine, normalize_url
from qalign.storage.migrate import _migration_connection
from qalign.storage.models import Base

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Render qalign's TypeDecorators (e.g. UTCDateTime) as their plain SQLAlchemy type, so
    # revisions never import application code.
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl!r}"
    return False


def _url() -> str:
    url = config.attributes.get("url")
    return normalize_url(url) if url else database_url()


def _run(connection: Connection) -> None:
    """Run the migrations on `connection`.

    SQLite: the connection must already hold the write transaction of
    `qalign.storage.migrate._migration_connection`; Alembic then treats it as the caller's and
    neither commits nor lets pysqlite autocommit the DDL, so the version read, every migration
    and the version stamp commit together or not at all. PostgreSQL: the connection is not in a
    transaction and Alembic runs the migrations in one of its own (DDL is transactional there).
    """
    sqlite = connection.dialect.name == "sqlite"
    if sqlite and not connection.in_transaction():
        raise RuntimeError(
            "SQLite migrations must run inside qalign's write transaction "
            "(qalign.storage.migrate.upgrade), else each DDL statement would commit on its own"
        )
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url(), pool_size=1, max_overflow=0)
    try:
        with _migration_connection(engine) as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
