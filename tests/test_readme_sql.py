"""The README's example analysis queries run on SQLite and PostgreSQL against a finished sweep."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from sqlalchemy import text

from qalign.config import parse_config
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep
from qalign.storage import make_engine, make_sessionmaker, upgrade
from qalign.toy.server import ToyServerOptions, serve_in_thread
from qalign.workers.execute import Services
from tests.sweeps_support import sweep_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
QUERIES = re.findall(r"```sql\n(.*?)```", README, re.S)


def test_readme_has_queries():
    assert len(QUERIES) >= 4


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_readme_queries_run(backend, sqlite_url, pg_url):
    url = sqlite_url if backend == "sqlite" else pg_url
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        cfg = parse_config(sweep_config("sql", g.url, r.url, prompts=2, beta=[0.5, 1.0], steps=4))
        sweep_id, _ = create_sweep(sessions, cfg)
        services = Services(sessions=sessions)

        async def go():
            try:
                return await run_locally(services, sweep_id, progress=False)
            finally:
                await services.close()

        asyncio.run(go())
    with engine.connect() as conn:
        results = [conn.execute(text(q)).all() for q in QUERIES]
    per_run, per_step, _reasons, trajectory, finals = results
    assert len(per_run) == 2 and all(row[1] == 4 * 4 for row in per_run)
    assert len(per_step) == 2 * 5
    assert [row[0] for row in trajectory] == [0, 1, 2, 3, 4]
    assert len(finals) == 2 * 2 * 2
