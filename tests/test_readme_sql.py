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
from qalign.steps.service import StepService
from qalign.storage import make_engine, make_sessionmaker, upgrade
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.sweeps_support import sweep_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
QUERIES = re.findall(r"```sql\n(.*?)```", README, re.S)

# The definition the README's one-pass per-step query must agree with (quadratic: too slow for
# a 10,000-chain sweep, see benchmarks/scale.py, but obviously right).
STATE_REWARD_BY_DEFINITION = """
SELECT p.run_id, s.step, AVG(p.reward)
FROM (SELECT DISTINCT run_id, step FROM proposals) s
JOIN proposals p ON p.run_id = s.run_id AND p.accepted AND p.step = (
    SELECT MAX(q.step) FROM proposals q
    WHERE q.chain_id = p.chain_id AND q.accepted AND q.step <= s.step)
GROUP BY p.run_id, s.step ORDER BY p.run_id, s.step
"""


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
        services = StepService(sessions)

        async def go():
            try:
                return await run_locally(services, sweep_id, progress=False)
            finally:
                await services.close()

        asyncio.run(go())
    with engine.connect() as conn:
        results = [conn.execute(text(q)).all() for q in QUERIES]
        expected = conn.execute(text(STATE_REWARD_BY_DEFINITION)).all()
    (per_run, per_step, accuracy, _reasons, trajectory, finals, step_errors, extensions,
     warm_started, cost, genealogy) = results  # fmt: skip
    assert len(per_run) == 2 and all(row[1] == 4 * 4 for row in per_run)
    assert len(per_step) == 2 * 5
    assert [r[:2] for r in per_step] == [r[:2] for r in expected]
    assert [r[2] for r in per_step] == pytest.approx([r[2] for r in expected], abs=1e-9)
    assert len(accuracy) == 2 * 5 and all(row[2] is None for row in accuracy)  # no eval yet
    assert [row[0] for row in trajectory] == [0, 1, 2, 3, 4]
    assert len(finals) == 2 * 2 * 2
    assert step_errors == []  # nothing failed in this sweep
    assert extensions == [] and warm_started == []  # see tests/test_extend.py for both
    assert genealogy == []  # no SMC run here; see tests/test_smc.py
    assert all(x is not None and x >= 0 for r in trajectory for x in r[6:9])  # cost columns
    assert len(cost) == 2 and all(row[1] == 2 * 2 * 5 and row[2] > 0 for row in cost)
