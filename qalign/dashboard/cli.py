"""`qalign dashboard`: serve the live, read-only web view of a database."""

from __future__ import annotations

import click

DB_HELP = "Database URL (default: $QALIGN_DATABASE_URL, else sqlite:///qalign.sqlite)."


@click.command("dashboard")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (the default is reachable from this machine only).",
)
@click.option("--port", default=8050, show_default=True, type=click.IntRange(0, 65535))
def dashboard_command(database: str | None, host: str, port: int) -> None:
    """Serve a live web dashboard of the sweeps in a database (read-only).

    Pages: every sweep; one sweep's runs with plots over steps; one run's prompts, acceptance
    by cut position and error-vs-compute curves; one chain's trajectory. Pages refresh
    themselves as steps commit.

    Example: qalign dashboard --database postgresql://user@host/db --port 8050
    """
    from aiohttp import web

    from qalign.dashboard.app import make_app
    from qalign.dashboard.db import readonly_engine
    from qalign.storage.engine import database_url, redact_url
    from qalign.storage.migrate import check_schema

    url = database_url(database)
    engine = readonly_engine(url)
    check_schema(engine)
    click.echo(f"qalign dashboard of {redact_url(url)} on http://{host}:{port}/ (read-only)")
    web.run_app(make_app(engine), host=host, port=port, print=None)
