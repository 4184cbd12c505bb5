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
    """Run the migrations on `connection`, which must not be inside a transaction (else Alembic
    treats it as the caller's transaction and leaves committing to the caller)."""
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch migrations rebuild a table by copying it and dropping the original; with foreign
        # keys enforced that DROP would cascade into child tables and delete their rows. The
        # pragma is a no-op inside a transaction, so it is set before Alembic begins one.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
        render_item=_render_item,
    )
    try:
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            connection.commit()
    finally:
        if sqlite:
            connection.rollback()  # a no-op after the commit above
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


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
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
