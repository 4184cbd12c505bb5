"""`qalign dashboard` in a real headless browser (Debian's chromium through Playwright), on
SQLite and PostgreSQL databases filled by real sweeps against the toy servers.

Every page must load without console errors and show the figures the database holds (checked
against SQL here); a screenshot of each page goes to the test's tmp_path. The live test commits
new steps (`qalign sweep extend --local`) while pages are open and waits for them to appear.
Without /usr/bin/chromium the browser tests skip, unless $QALIGN_REQUIRE_BROWSER=1
(scripts/test.sh sets it and installs the browser), which makes them fail instead.
"""

from __future__ import annotations

import math
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from qalign.analysis.convergence import run_diagnostics
from qalign.dashboard.app import Served, serve_in_thread
from qalign.dashboard.db import readonly_engine
from qalign.storage.engine import make_sessionmaker
from qalign.storage.migrate import ensure_schema
from tests.runners import LocalRunner
from tests.sweeps_support import cli, sweep_config

CHROMIUM = Path("/usr/bin/chromium")
TASK = "benchmarks.scale:FirstWordYes"  # the toy task: right when the first word is "yes"
STEPS = 6


def _browser_or_skip() -> None:
    if CHROMIUM.exists():
        return
    message = f"no browser at {CHROMIUM} (apt-get install chromium; scripts/test.sh does)"
    if os.environ.get("QALIGN_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " and QALIGN_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[Any]:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Page:
    """A browser tab that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, base: str, shots: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.base = base
        self.shots = shots
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, path: str) -> Any:
        self.page.goto(self.base + path)
        self.page.wait_for_selector("body[data-updated]", timeout=10_000)
        return self.page

    def cell(self, table: str, row: str, col: str) -> str:
        sel = f'[data-table="{table}"] tr[data-key="{row}"] td[data-col="{col}"]'
        return str(self.page.locator(sel).inner_text()).strip()

    def stat(self, key: str) -> str:
        return str(self.page.locator(f'[data-stat="{key}"] dd').inner_text()).strip()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 0
        return path


def f3(x: Any) -> str:
    return "-" if x is None else f"{float(x):.3f}"  # PostgreSQL's AVG is a Decimal


def f1(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1f}"


def rhat(x: float) -> str:
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2e}" if abs(x) >= 1e4 else f"{x:.3f}"  # as dashboard.js writes it


def pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


@pytest.fixture
def filled(db_url: str, tmp_path: Path, toy: tuple[str, str]) -> tuple[str, dict[str, Any]]:
    """A database with a two-run sweep (beta 0.5 and 1) whose proposals are all checked."""
    cfg = sweep_config("dash", *toy, prompts=3, beta=(0.5, 1.0), steps=STEPS, chains=3)
    out = LocalRunner(db_url, tmp_path).run(cfg)
    assert out.returncode == 0, out.stderr
    ev = cli("eval", "dash", "--task", TASK, "--database", db_url, "--quiet")
    assert ev.returncode == 0, ev.stderr
    return db_url, cfg


@pytest.fixture
def served(filled: tuple[str, dict[str, Any]]) -> Iterator[Served]:
    engine = readonly_engine(filled[0])
    try:
        with serve_in_thread(engine) as s:
            yield s
    finally:
        engine.dispose()


def sql(db_url: str, query: str, **params: Any) -> list[Any]:
    engine = readonly_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query), params).all())
    finally:
        engine.dispose()


# The proposal that is each chain's current state: its last accepted step (step 0 always is).
CURRENT_STATE = """
SELECT c.id AS chain_id, c.run_id, pr.prompt_index, p.id AS proposal_id
FROM chains c JOIN prompts pr ON pr.id = c.prompt_id
JOIN proposals p ON p.chain_id = c.id AND p.step = (
  SELECT MAX(q.step) FROM proposals q WHERE q.chain_id = c.id AND (q.accepted OR q.step = 0))
"""


def test_every_page_shows_the_database_figures(
    served: Served, filled: tuple[str, dict[str, Any]], browser: Any, tmp_path: Path
) -> None:
    db_url, _ = filled
    tab = Page(browser, served.url, tmp_path)

    # ---- sweeps page
    tab.open("/")
    ((sweep_id, chains, done, steps, total),) = sql(
        db_url,
        "SELECT s.id, COUNT(c.id), SUM(CASE WHEN c.status = 'done' THEN 1 ELSE 0 END), "
        "SUM(c.current_step + 1), SUM(c.target_steps + 1) FROM sweeps s "
        "JOIN runs r ON r.sweep_id = s.id JOIN chains c ON c.run_id = r.id GROUP BY s.id",
    )
    ((proposals,),) = sql(db_url, "SELECT COUNT(*) FROM proposals")
    assert steps == proposals == total == 2 * 3 * 3 * (STEPS + 1)
    key = str(sweep_id)
    assert tab.cell("sweeps", key, "name") == "dash"
    assert tab.cell("sweeps", key, "chains") == f"{done}/{chains}"
    assert tab.cell("sweeps", key, "steps") == f"{steps}/{total}"
    assert tab.cell("sweeps", key, "progress") == "100.0%"
    assert tab.cell("sweeps", key, "failed") == "0"
    tab.shot("sweeps")

    # ---- sweep page: one row per run, the grid values as columns
    tab.open(f"/sweep/{sweep_id}")
    runs = sql(
        db_url,
        "SELECT r.id, r.beta, "
        "SUM(CASE WHEN p.step > 0 AND p.accepted THEN 1 ELSE 0 END) * 1.0 / "
        "SUM(CASE WHEN p.step > 0 THEN 1 ELSE 0 END) FROM runs r "
        "JOIN proposals p ON p.run_id = r.id GROUP BY r.id, r.beta ORDER BY r.id",
    )
    rewards = dict(sql(db_url, "SELECT run_id, AVG(state_reward) FROM chains GROUP BY run_id"))
    assert len(runs) == 2
    for run_id, beta, acceptance in runs:
        row = str(run_id)
        assert tab.cell("runs", row, "beta") == f"{beta:g}"
        assert tab.cell("runs", row, "model") == "toy-lm"
        assert tab.cell("runs", row, "acceptance") == f3(acceptance)
        assert tab.cell("runs", row, "state_reward") == f3(rewards[run_id])
        assert tab.cell("runs", row, "progress") == f"{3 * 3 * (STEPS + 1)}/{3 * 3 * (STEPS + 1)}"
    headers = tab.page.locator('[data-table="runs"] th').all_inner_texts()
    assert "mean reward of current states" in headers and "mean reward" not in headers
    # The plots over steps arrive once the background analysis is done (polled, no reload).
    for chart in ("state_reward", "acceptance", "length", "rhat", "ess"):
        fig = tab.page.locator(f'[data-chart="{chart}"] path[data-series]')
        fig.first.wait_for(timeout=15_000)
        assert fig.count() == 2, chart  # one series per run
    first_run = runs[0][0]
    # The acceptance plot's last point is the acceptance of the last step, from SQL.
    ((last_acc,),) = sql(
        db_url,
        "SELECT AVG(CASE WHEN accepted THEN 1.0 ELSE 0.0 END) FROM proposals "
        "WHERE run_id = :r AND step = :k",
        r=first_run,
        k=STEPS,
    )
    paths = tab.page.locator('[data-chart="acceptance"] path[data-series]')
    last = paths.first.get_attribute("data-last")
    assert last is not None
    x, y = last.split(",")
    assert int(x) == STEPS and float(y) == pytest.approx(float(last_acc))
    tab.shot("sweep")

    # ---- run page: per-prompt table with the accuracy of the current answers
    tab.open(f"/run/{first_run}")
    tab.page.locator('[data-chart="cut"] path[data-series]').wait_for(timeout=15_000)
    tab.page.locator('[data-chart="curves"] path[data-series="qalign"]').wait_for(timeout=30_000)
    acc = sql(
        db_url,
        f"SELECT s.prompt_index, AVG(CASE WHEN a.correct THEN 1.0 ELSE 0.0 END) "
        f"FROM ({CURRENT_STATE}) s JOIN answers a ON a.proposal_id = s.proposal_id "
        "WHERE s.run_id = :r GROUP BY s.prompt_index",
        r=first_run,
    )
    assert len(acc) == 3
    for prompt_index, accuracy in acc:
        assert tab.cell("prompts", str(prompt_index), "accuracy") == pct(accuracy)
        assert tab.cell("prompts", str(prompt_index), "chains") == "3/3"
    # R-hat and ESS per prompt are those of `qalign sweep status`'s diagnostics.
    engine = readonly_engine(db_url)
    try:
        diag = run_diagnostics(make_sessionmaker(engine), first_run)
    finally:
        engine.dispose()
    assert len(diag.prompts) == 3
    for d in diag.prompts:
        k = str(d.prompt_index)
        assert tab.cell("prompts", k, "rhat_reward") == rhat(d.reward.rhat)
        assert tab.cell("prompts", k, "rhat_length") == rhat(d.length.rhat)
        assert tab.cell("prompts", k, "ess_bulk") == f1(d.reward.ess_bulk)
        assert tab.cell("prompts", k, "ess_tail") == f1(d.reward.ess_tail)
    series = tab.page.locator('[data-chart="curves"] path[data-series]').evaluate_all(
        "ps => ps.map(p => p.dataset.series)"
    )
    assert set(series) == {"mv", "wmv", "bon", "qalign"}
    # the same methods against server-seconds (every proposal stores its latencies)
    seconds = tab.page.locator('[data-chart="curves_seconds"] path[data-series]').evaluate_all(
        "ps => ps.map(p => p.dataset.series)"
    )
    assert set(seconds) == {"mv", "wmv", "bon", "qalign"}
    ((cut_props,),) = sql(
        db_url, "SELECT COUNT(*) FROM proposals WHERE run_id = :r AND step > 0", r=first_run
    )
    assert cut_props == 3 * 3 * STEPS
    tab.shot("run")

    # ---- chain page: the trajectory proposal by proposal
    ((chain_id,),) = sql(db_url, "SELECT MIN(id) FROM chains WHERE run_id = :r", r=first_run)
    tab.open(f"/chain/{chain_id}")
    props = sql(
        db_url,
        "SELECT step, accepted, reward, gen_tokens, cut FROM proposals WHERE chain_id = :c "
        "ORDER BY step",
        c=chain_id,
    )
    rows = tab.page.locator('[data-table="trajectory"] tbody tr')
    assert rows.count() == len(props) == STEPS + 1
    for step, accepted, reward, gen_tokens, cut in props:
        k = str(step)
        want = "initial" if step == 0 else ("accepted" if accepted else "rejected")
        assert tab.cell("trajectory", k, "decision") == want
        assert tab.cell("trajectory", k, "reward") == f3(reward)
        assert tab.cell("trajectory", k, "gen_tokens") == str(gen_tokens)
        assert tab.cell("trajectory", k, "cut") == str(cut)
    assert tab.page.locator('[data-table="trajectory"] mark.cutmark').count() == STEPS
    tab.shot("chain")

    assert tab.errors == []
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "chain.png", "run.png", "sweep.png", "sweeps.png",
    ]  # fmt: skip


def test_pages_show_new_steps_without_reloading(
    served: Served, filled: tuple[str, dict[str, Any]], browser: Any, tmp_path: Path
) -> None:
    db_url, _ = filled
    ((chain_id,),) = sql(db_url, "SELECT MIN(id) FROM chains")
    sweeps = Page(browser, served.url, tmp_path)
    sweeps.open("/")
    chain = Page(browser, served.url, tmp_path)
    chain.open(f"/chain/{chain_id}")
    total = 2 * 3 * 3 * (STEPS + 1)
    assert sweeps.cell("sweeps", "1", "steps") == f"{total}/{total}"
    loads = sweeps.page.evaluate("performance.getEntriesByType('navigation').length")

    out = cli("sweep", "extend", "dash", "--steps", str(STEPS + 2), "--local",
              "--database", db_url)  # fmt: skip
    assert out.returncode == 0, out.stderr
    # Committed by now: each page must show it within 5 s, through its polling alone.
    new = f'[data-table="trajectory"] tr[data-key="{STEPS + 2}"]'
    chain.page.wait_for_selector(new, timeout=5_000)
    grown = 2 * 3 * 3 * (STEPS + 3)
    sweeps.page.wait_for_function(
        'want => document.querySelector(\'[data-table="sweeps"] td[data-col="steps"]\')'
        ".textContent === want",
        arg=f"{grown}/{grown}",
        timeout=5_000,
    )
    assert sweeps.page.evaluate("performance.getEntriesByType('navigation').length") == loads
    chain.shot("chain-live")
    assert sweeps.errors == [] and chain.errors == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_dashboard_engine_cannot_write(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    ensure_schema(url)
    engine = readonly_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM sweeps")).scalar_one() == 0
        with pytest.raises(DBAPIError, match=r"(?i)read-?only"), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO sweeps (name, config, config_hash, status, created_at, "
                    "updated_at) VALUES ('x', '{}', 'h', 'active', '2024-01-01', '2024-01-01')"
                )
            )
    finally:
        engine.dispose()


def test_missing_sqlite_file_is_refused_not_created(tmp_path: Path) -> None:
    from qalign.storage.errors import DatabaseConnectionError

    path = tmp_path / "absent.sqlite"
    with pytest.raises(DatabaseConnectionError, match="only reads an existing database"):
        readonly_engine(f"sqlite:///{path}")
    assert not path.exists()


def test_health_and_unknown_ids(served: Served) -> None:
    with urllib.request.urlopen(served.url + "/healthz", timeout=30) as r:
        assert r.status == 200
    for path in ("/api/sweep/999", "/api/run/999", "/api/chain/999"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(served.url + path, timeout=30)
        assert err.value.code == 404


def test_the_command_serves_a_database_on_localhost(sqlite_url: str) -> None:
    import json
    import socket
    import subprocess
    import time

    from tests.sweeps_support import QALIGN, ROOT

    ensure_schema(sqlite_url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [*QALIGN, "dashboard", "--database", sqlite_url, "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/sweeps", timeout=5) as r:
                    doc = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.2)
        assert doc["tables"][0]["rows"] == []
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "read-only" in out and f"127.0.0.1:{port}" in out
