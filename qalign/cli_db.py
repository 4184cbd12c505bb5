"""`qalign db ...`: create, upgrade and check the database schema (Alembic migrations)."""

from __future__ import annotations

import click

_DATABASE_HELP = (
    "Database URL. Default: $QALIGN_DATABASE_URL, else sqlite:///qalign.sqlite in the current "
    "directory. postgresql:// and postgres:// URLs use psycopg 3."
)


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group(name="db", context_settings={"help_option_names": ["-h", "--help"]})
def db_group() -> None:
    """Create, upgrade and check the qalign database schema.

    `qalign run` creates or upgrades the schema itself; workers and the other commands refuse to
    start unless the database is exactly at this qalign's schema revision (use `qalign db check`
    to see why, `qalign db upgrade` to fix it).
    """


@db_group.command()
@click.option("--database", metavar="URL", default=None, help=_DATABASE_HELP)
@click.option(
    "--revision",
    default="head",
    show_default=True,
    help="Target revision; 'head' is the newest this qalign knows.",
)
def upgrade(database: str | None, revision: str) -> None:
    """Create the schema in an empty database, or upgrade an older one.

    Safe to run repeatedly (a database already at the target is left alone) and concurrently
    on PostgreSQL (upgrades take a lock). A database migrated by a newer qalign is refused.

    \b
    Examples:
      qalign db upgrade
      qalign db upgrade --database postgresql://qalign:secret@db.example:5432/qalign
    """
    from qalign.storage import StorageError, current_revision, database_url, make_engine, redact_url
    from qalign.storage import upgrade as run_upgrade

    try:
        url = database_url(database)
        shown = redact_url(url)
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            before = current_revision(engine)
            run_upgrade(engine, revision)
            after = current_revision(engine)
        finally:
            engine.dispose()
    except StorageError as exc:
        _fail(str(exc))
        return
    if before == after:
        click.echo(f"{shown}: already at revision {after}")
    else:
        click.echo(f"{shown}: upgraded from {before or 'an empty database'} to {after}")


@db_group.command()
@click.option("--database", metavar="URL", default=None, help=_DATABASE_HELP)
def check(database: str | None) -> None:
    """Check that the schema is exactly this qalign's newest revision.

    Exits 0 and prints the revision when it is; otherwise exits 1 and says why (empty
    database, older schema, or a schema from a newer qalign) and what to do.

    \b
    Examples:
      qalign db check
      qalign db check --database postgresql://qalign@db.example:5432/qalign
    """
    from qalign.storage import StorageError, check_schema, database_url, make_engine, redact_url

    try:
        url = database_url(database)
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            head = check_schema(engine)
        finally:
            engine.dispose()
    except StorageError as exc:
        _fail(str(exc))
        return
    click.echo(f"{redact_url(url)}: schema at head revision {head}")


__all__ = ["db_group"]
