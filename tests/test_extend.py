"""Extending sweeps (`qalign sweep extend`) and warm-starting them (`warm_start`), on both runners.

The proof of an extension is a comparison: a sweep run for N steps and extended to 2N stores
exactly the proposals (tokens, cut, reward, decision, state) of a sweep run for 2N steps from the
start with the same seed, and the toy generator's request counter shows that the extension asked
for the new steps only. `runner` runs each such test through `qalign run` (SQLite) and through
`qalign sweep create` + a `qalign worker` (PostgreSQL, a private Redis), as in test_runners.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, func, select, text

from benchmarks.chaos import PrivateRedis
from qalign.config import ConfigError, parse_config
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.outcome import Result
from qalign.steps.service import StepService
from qalign.storage import repo
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import upgrade
from qalign.storage.models import Chain, Prompt, Proposal, Run, Sweep, SweepExtension
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.runners import CeleryRunner, LocalRunner
from tests.stub_servers import Gate, proxy_app, serve_in_background
from tests.sweeps_support import (
    QALIGN,
    ROOT,
    Broker,
    Worker,
    cli,
    run_sweep_locally,
    sweep_config,
    workers,
)
from tests.sweeps_support import write_config as write_yaml

COMPLETIONS = "/v1/completions"
README_SQL = {
    q.splitlines()[0]: q
    for q in re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
}
EXTENSIONS_SQL = README_SQL["-- extensions (`qalign sweep extend`), oldest first"]
WARM_STARTED_SQL = README_SQL[
    "-- warm-started chains (`warm_start`) and where their initial state came from"
]

# ---- the two runners (as in test_runners.py) -----------------------------------------------


@pytest.fixture(scope="module")
def celery_db(pg_admin: Engine) -> Iterator[str]:
    from sqlalchemy import make_url

    from tests.conftest import PG_MAINTENANCE_URL

    name = f"qalign_test_{secrets.token_hex(6)}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_MAINTENANCE_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def celery_runner(
    celery_db: str, redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryRunner]:
    upgrade(celery_db)
    # The second-to-last database of the session's Redis: the last is test_runners' module
    # worker's, and the per-test `broker` numbers count up from 1.
    broker = Broker(redis_server.url, db=redis_server.databases - 2)
    broker.redis.flushdb()
    logs = tmp_path_factory.mktemp("extend-worker")
    worker = Worker("extend@host", celery_db, broker, concurrency=8, log_dir=logs)
    with workers(worker):
        yield CeleryRunner(celery_db, logs, broker, worker)
    broker.redis.flushdb()
    broker.redis.close()


@pytest.fixture(params=["local", "celery"])
def runner(request: pytest.FixtureRequest, tmp_path: Path) -> LocalRunner | CeleryRunner:
    if request.param == "local":
        return LocalRunner(f"sqlite:///{tmp_path / 'run.sqlite'}", tmp_path)
    celery: CeleryRunner = request.getfixturevalue("celery_runner")
    celery.tmp = tmp_path
    return celery


@pytest.fixture
def servers() -> Iterator[Any]:
    """A fresh toy generator and reward model (their request counters start at zero)."""
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm", "toy-lm-b"), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        yield g, r


def unique(runner: Any, stem: str) -> str:
    return f"{stem}-{runner.name}-{secrets.token_hex(3)}"


def extend(runner: Any, sweep: str, steps: int, *flags: str) -> subprocess.CompletedProcess[str]:
    """`qalign sweep extend`: run here (`--local`) or enqueued for the worker, until settled."""
    args = ["sweep", "extend", sweep, "--steps", str(steps), "--database", runner.db_url, *flags]
    if runner.name == "local":
        out = cli(*args, "--local", "--quiet")
        assert out.returncode == 0, out.stderr
        return out
    out = cli(*args, env=runner.broker.env())
    assert out.returncode == 0, out.stderr
    runner.wait_settled(sweep, 240)
    return out


# ---- reading a sweep back ------------------------------------------------------------------


def proposal_rows(sessions: Any, sweep: str) -> list[tuple[Any, ...]]:
    """Every stored proposal with everything that defines it, keyed by (chain key, step)."""
    with sessions() as s:
        rows = s.execute(
            select(
                Chain.rng_key, Proposal.step, Proposal.cut, Proposal.new_tokens,
                Proposal.response_len, Proposal.text, Proposal.reward, Proposal.log_a,
                Proposal.alpha, Proposal.accepted, Proposal.finish, Proposal.reject_reason,
                Proposal.gen_seed, Proposal.gen_tokens, Proposal.reward_tokens,
            )
            .join(Chain, Chain.id == Proposal.chain_id)
            .join(Run, Run.id == Chain.run_id)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(Sweep.name == sweep)
        ).all()  # fmt: skip
    return sorted((r[0], r[1], r[2], tuple(r[3]), *r[4:]) for r in rows)


def chain_rows(sessions: Any, sweep: str) -> list[tuple[Any, ...]]:
    with sessions() as s:
        rows = s.execute(
            select(
                Chain.rng_key, Chain.status, Chain.current_step, Chain.target_steps,
                Chain.state_tokens, Chain.state_reward, Chain.state_text, Chain.state_finish,
                Chain.accepted_steps, Chain.rejected_with_reason,
            )
            .join(Run, Run.id == Chain.run_id)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(Sweep.name == sweep)
        ).all()  # fmt: skip
    return sorted((r[0], r[1], r[2], r[3], tuple(r[4]), *r[5:]) for r in rows)


def proposal_ids(sessions: Any, sweep: str) -> dict[tuple[str, int], tuple[int, Any]]:
    with sessions() as s:
        rows = s.execute(
            select(Chain.rng_key, Proposal.step, Proposal.id, Proposal.created_at)
            .join(Chain, Chain.id == Proposal.chain_id)
            .join(Run, Run.id == Chain.run_id)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(Sweep.name == sweep)
        ).all()
    return {(k, step): (pid, at) for k, step, pid, at in rows}


def status(runner: Any, sweep: str) -> list[dict[str, Any]]:
    out = cli("sweep", "status", sweep, "--database", runner.db_url, "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


# ---- extension -----------------------------------------------------------------------------


def test_extension_equals_a_fresh_run_proposal_for_proposal(runner: Any, servers: Any) -> None:
    """N -> 2N steps equals a fresh 2N run, and the extension generates only the new steps."""
    g, r = servers
    n, chains = 4, 2 * 2 * 2  # 2 runs x 2 prompts x 2 chains
    name, fresh = unique(runner, "ext"), unique(runner, "fresh")
    cfg = sweep_config(name, g.url, r.url, prompts=2, beta=[0.5, 1.0], steps=n, chains=2)
    assert runner.run(cfg).returncode == 0
    assert g.metrics()["requests"][COMPLETIONS] == chains * (n + 1)
    first = proposal_ids(runner.sessions, name)
    assert len(first) == chains * (n + 1)

    g.reset_metrics()
    r.reset_metrics()
    out = extend(runner, name, 2 * n)
    assert out.stdout.count(f"{n} -> {2 * n} steps per chain (4 finished chain(s) reopened)") == 2
    # Only the new steps were generated: one generation per chain and new step, and at most
    # one scoring request per new scored proposal (a worker's reward client caches repeated
    # responses) beyond each reward client's startup probes (the probe conversation scored in
    # token-id form and in chat form, then in chat form with use_activation true: three
    # requests, one of them activated). The old steps are the very same rows.
    assert g.metrics()["requests"][COMPLETIONS] == chains * n
    new = [p for p in proposal_rows(runner.sessions, name) if p[1] > n]
    assert len(new) == chains * n
    rm = r.metrics()
    scoring = rm["requests"]["/classify"] - 3 * rm["activated_requests"]
    assert 0 < scoring <= sum(1 for p in new if p[14] is not None)
    after = proposal_ids(runner.sessions, name)
    assert {k: v for k, v in after.items() if k[1] <= n} == first

    cfg_fresh = sweep_config(fresh, g.url, r.url, prompts=2, beta=[0.5, 1.0], steps=2 * n, chains=2)
    assert runner.run(cfg_fresh).returncode == 0
    extended = proposal_rows(runner.sessions, name)
    assert len(extended) == chains * (2 * n + 1)
    assert extended == proposal_rows(runner.sessions, fresh)  # proposal for proposal
    assert chain_rows(runner.sessions, name) == chain_rows(runner.sessions, fresh)
    assert {c[1] for c in chain_rows(runner.sessions, name)} == {"done"}

    # The new totals everywhere, and the extension recorded per run.
    rows = status(runner, name)
    assert [(x["steps_done"], x["steps_total"]) for x in rows] == [(4 * (2 * n + 1),) * 2] * 2
    assert all(x["chains_done"] == 4 and x["eta_s"] == 0.0 and x["extended_at"] for x in rows)
    with runner.sessions() as s:
        sweep_id = s.execute(select(Sweep.id).where(Sweep.name == name)).scalar_one()
        runs = s.execute(select(Run).where(Run.sweep_id == sweep_id)).scalars().all()
        assert [(x.steps, x.config["steps"]) for x in runs] == [(2 * n, 2 * n)] * 2
        assert all(f"steps={n}" in x.name for x in runs)  # names keep the created grid point
        history = s.execute(
            select(SweepExtension.old_steps, SweepExtension.new_steps, SweepExtension.steps_done)
            .where(SweepExtension.sweep_id == sweep_id)
        ).all()  # fmt: skip
    assert sorted(tuple(h) for h in history) == [(n, 2 * n, 4 * (n + 1))] * 2
    shown = yaml.safe_load(cli("sweep", "show", name, "--database", runner.db_url).stdout)
    assert [(e["old_steps"], e["new_steps"]) for e in shown["extensions"]] == [(n, 2 * n)] * 2
    assert shown["config"]["steps"] == [n]  # the config as created; the history says the rest
    with runner.sessions() as s:
        readme = [row for row in s.execute(text(EXTENSIONS_SQL)).all() if row[0] == name]
    assert [tuple(row[2:5]) for row in readme] == [(n, 2 * n, 4 * (n + 1))] * 2


def test_an_interrupted_extension_resumes_to_the_same_chains(
    servers: Any, sqlite_url: str, tmp_path: Path
) -> None:
    """`sweep extend --local` interrupted mid-way (Ctrl-C), then `qalign run` with the config the
    sweep was created with (not refused: its fingerprint is unchanged), ends identical to a fresh
    run; the steps committed before the interrupt are kept, not redone."""
    g, r = servers
    n, chains = 4, 2 * 4
    # The gate passes the first run's 40 generations and 12 of the extension's 32, and holds the
    # rest: the interrupt, sent once 46 steps are committed, always lands mid-extension.
    gate = Gate(allow=chains * (n + 1) + 12)
    with serve_in_background(proxy_app(g.url, gate=gate)) as gated:
        cfg = sweep_config("interrupted", gated, r.url, prompts=2, beta=1.0, steps=n, chains=4)
        cfg["generator"]["timeout"] = 300  # held requests wait for the signal, not a retry
        path = write_yaml(tmp_path, cfg)
        assert cli("run", str(path), "--database", sqlite_url, "--quiet").returncode == 0
        sessions = make_sessionmaker(make_engine(sqlite_url))
        proc = subprocess.Popen(
            [*QALIGN, "sweep", "extend", "interrupted", "--steps", str(2 * n), "--local",
             "--quiet", "--database", sqlite_url],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300  # wide for a loaded machine, < pytest's 600 s
            while len(proposal_ids(sessions, "interrupted")) < chains * (n + 1) + 6:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the extension made no progress in 300 s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            gate.open()
        assert proc.returncode != 0 and "to resume" in err, err
        partial = proposal_ids(sessions, "interrupted")
        assert chains * (n + 1) + 6 <= len(partial) < chains * (2 * n + 1)
        out = cli("run", str(path), "--database", sqlite_url, "--quiet")
        assert out.returncode == 0 and "resuming sweep 'interrupted'" in out.stderr, out.stderr
    after = proposal_ids(sessions, "interrupted")
    assert len(after) == chains * (2 * n + 1)
    assert {k: after[k] for k in partial} == partial  # committed steps were not taken again
    fresh = sweep_config("fresh", g.url, r.url, prompts=2, beta=1.0, steps=2 * n, chains=4)
    path = write_yaml(tmp_path, fresh)
    assert cli("run", str(path), "--database", sqlite_url, "--quiet").returncode == 0
    assert proposal_rows(sessions, "interrupted") == proposal_rows(sessions, "fresh")
    assert chain_rows(sessions, "interrupted") == chain_rows(sessions, "fresh")


def test_extend_refuses_what_it_cannot_do_and_extends_only_the_runs_named(
    sqlite_url: str, tmp_path: Path, toy: tuple[str, str]
) -> None:
    upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    cfg = sweep_config("grid", *toy, prompts=1, beta=[0.5, 1.0], steps=[2, 3], chains=1)
    sweep_id, _ = create_sweep(sessions, parse_config(cfg), check=False)
    anc = sweep_config("anc", *toy, prompts=1, chains=2, method="ancestral")
    del anc["steps"], anc["beta"]
    create_sweep(sessions, parse_config(anc), check=False)
    db = ["--database", sqlite_url]

    def refused(*args: str) -> str:
        out = cli("sweep", "extend", *args, *db, "--no-enqueue")
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        return out.stderr

    assert "no sweep 'nope'" in refused("nope", "--steps", "5")
    assert "already has 3 steps per chain: --steps must be larger" in refused(
        "grid", "--steps", "3"
    )
    assert "is ancestral" in refused("anc", "--steps", "5")
    assert "has no run 'beta=7'" in refused("grid", "--steps", "5", "--run", "beta=7")
    assert "over the limit of 1000000" in refused("grid", "--steps", "1000001")
    both = cli("sweep", "extend", "grid", "--steps", "5", "--local", "--no-enqueue", *db)
    assert both.returncode != 0 and "give one of them" in both.stderr
    with sessions() as s:
        assert s.execute(select(func.count()).select_from(SweepExtension)).scalar() == 0
        runs = (
            s.execute(select(Run).where(Run.sweep_id == sweep_id).order_by(Run.grid_index))
            .scalars()
            .all()
        )
        assert [x.steps for x in runs] == [2, 3, 2, 3]

    # Only the runs named (by name or id) are extended.
    picked = [runs[1].name, str(runs[2].id)]
    out = cli("sweep", "extend", "grid", "--steps", "6", "--run", picked[0], "--run", picked[1],
              "--no-enqueue", *db)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "3 -> 6" in out.stdout and "2 -> 6" in out.stdout and "qalign run CONFIG" in out.stdout
    with sessions() as s:
        targets = dict(
            s.execute(
                select(Run.grid_index, func.max(Chain.target_steps))
                .join(Chain, Chain.run_id == Run.id)
                .where(Run.sweep_id == sweep_id)
                .group_by(Run.grid_index)
            ).all()
        )
    assert targets == {0: 2, 1: 6, 2: 6, 3: 3}

    # A config that differs only in `steps` is refused, with the way to extend instead.
    bigger = write_yaml(tmp_path, {**cfg, "steps": [4, 5]})
    out = cli("run", str(bigger), "--database", sqlite_url, "--quiet", "--no-check")
    assert out.returncode != 0 and "qalign sweep extend grid --steps N" in out.stderr

    # A cancelled sweep's reopened chains stay cancelled until it is resumed.
    repo.cancel_sweep(sessions, sweep_id)
    extended = repo.extend_sweep(sessions, sweep_id, 7)
    assert [e.new_steps for e in extended] == [7] * 4
    with sessions() as s:
        statuses = s.execute(
            select(Chain.status).join(Run).where(Run.sweep_id == sweep_id)
        ).scalars()
        assert set(statuses) == {"cancelled"}


def test_a_step_committed_while_its_chain_is_extended_continues_the_chain(
    sqlite_url: str, toy: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step of a chain read before an extension and committed after it leaves the
    chain running (the commit reads the stored target), and the step service goes on."""
    upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    cfg = parse_config(sweep_config("race", *toy, prompts=1, beta=1.0, steps=1, chains=1))
    sweep_id, _ = create_sweep(sessions, cfg, check=False)
    with sessions() as s:
        chain_id = s.execute(select(Chain.id)).scalar_one()
    commit = repo.commit_steps  # what the step service commits through

    def extend_then_commit(sessions_: Any, batch: list[dict[str, Any]]) -> list[int | None]:
        if any(params["step"] == 1 for params in batch):
            repo.extend_sweep(sessions_, sweep_id, 3)  # between the step's read and its commit
        return commit(sessions_, batch)

    monkeypatch.setattr(repo, "commit_steps", extend_then_commit)

    async def steps() -> list[Any]:
        service = StepService(sessions)
        try:
            return [await service.take(chain_id, k) for k in range(4)]
        finally:
            await service.close()

    outs = asyncio.run(steps())
    assert [o.result for o in outs] == [Result.COMMITTED] * 4
    assert [o.next_step for o in outs] == [1, 2, 3, None]
    assert [o.chain_status for o in outs] == ["running"] * 3 + ["done"]
    with sessions() as s:
        chain = s.get(Chain, chain_id)
        assert chain is not None and (chain.current_step, chain.status) == (3, "done")


def test_status_counts_the_new_totals_and_times_the_steps_since_the_extension(
    sqlite_url: str, toy: tuple[str, str]
) -> None:
    from qalign.cli_sweep import _status_rows

    upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    cfg = parse_config(sweep_config("eta", *toy, prompts=1, beta=1.0, steps=2, chains=2))
    sweep_id, _ = create_sweep(sessions, cfg, check=False)

    run_sweep_locally(sessions, sweep_id)
    (row,) = _status_rows(sessions, sweep_id)
    assert (row["steps_done"], row["steps_total"], row["eta_s"], row["extended_at"]) == (
        6, 6, 0.0, None,
    )  # fmt: skip
    repo.extend_sweep(sessions, sweep_id, 5)
    (row,) = _status_rows(sessions, sweep_id)
    # No step since the extension: no throughput to extrapolate from (not the first steps').
    assert (row["steps_done"], row["steps_total"], row["chains_done"]) == (6, 12, 0)
    assert row["steps_per_s"] is None and row["eta_s"] is None and row["extended_at"]
    run_sweep_locally(sessions, sweep_id)
    (row,) = _status_rows(sessions, sweep_id)
    assert (row["steps_done"], row["steps_total"], row["chains_done"]) == (12, 12, 2)
    assert row["steps_per_s"] is not None and row["steps_per_s"] > 0 and row["eta_s"] == 0.0


# ---- warm start ----------------------------------------------------------------------------

WARM_SQL = """
SELECT c.id, c.source_chain_id, c.source_step, src.state_tokens, p.new_tokens
FROM chains c
JOIN chains src ON src.id = c.source_chain_id
JOIN proposals p ON p.chain_id = c.id AND p.step = 0
JOIN runs r ON r.id = c.run_id JOIN sweeps s ON s.id = r.sweep_id
WHERE s.name = :name
"""


def _json(value: Any) -> Any:
    """A JSON column read through raw SQL: text on SQLite, decoded on PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def test_warm_start_begins_each_chain_at_the_source_chains_final_state(
    runner: Any, servers: Any
) -> None:
    g, r = servers
    src, warm = unique(runner, "src"), unique(runner, "warm")
    cfg = sweep_config(src, g.url, r.url, prompts=2, beta=1.0, steps=3, chains=2)
    assert runner.run(cfg).returncode == 0
    g.reset_metrics()
    wcfg = sweep_config(warm, g.url, r.url, prompts=2, beta=[0.5, 2.0], steps=2, chains=2)
    wcfg |= {"seed": 99, "warm_start": {"sweep": src}}
    out = runner.run(wcfg)
    assert out.returncode == 0, out.stderr
    # No generation for step 0: 2 runs x 4 chains x 2 steps.
    assert g.metrics()["requests"][COMPLETIONS] == 2 * 4 * 2

    with runner.sessions() as s:
        sources = {
            (pi, k): (cid, tuple(tokens), reward, text_, step)
            for cid, pi, k, tokens, reward, text_, step in s.execute(
                select(Chain.id, Prompt.prompt_index, Chain.chain_index, Chain.state_tokens,
                       Chain.state_reward, Chain.state_text, Chain.current_step)
                .join(Prompt, Prompt.id == Chain.prompt_id)
                .join(Sweep, Sweep.id == Prompt.sweep_id)
                .where(Sweep.name == src)
            ).all()
        }  # fmt: skip
        started = s.execute(
            select(Prompt.prompt_index, Chain.chain_index, Chain.source_chain_id,
                   Chain.source_step, Proposal)
            .join(Prompt, Prompt.id == Chain.prompt_id)
            .join(Sweep, Sweep.id == Prompt.sweep_id)
            .join(Proposal, (Proposal.chain_id == Chain.id) & (Proposal.step == 0))
            .where(Sweep.name == warm)
        ).all()  # fmt: skip
        warm_sql = s.execute(text(WARM_SQL), {"name": warm}).all()
        readme = [row for row in s.execute(text(WARM_STARTED_SQL)).all() if row[2] == src]
        plain_sql = s.execute(text(WARM_SQL), {"name": src}).all()
    assert len(started) == 2 * 4
    for pi, k, source_id, source_step, p in started:
        cid, tokens, reward, text_, step = sources[(pi, k)]
        assert (source_id, source_step, step) == (cid, 3, 3)
        assert (tuple(p.new_tokens), p.reward, p.text, p.cut) == (tokens, reward, text_, 0)
        assert (p.accepted, p.endpoint, p.gen_seed, p.reward_tokens) == (
            True, "warm-start", -1, None,
        )  # fmt: skip
    assert len(warm_sql) == 8 and all(_json(row[3]) == _json(row[4]) for row in warm_sql)
    assert plain_sql == []  # the source's own chains were not warm-started
    assert sorted((row[3], row[4]) for row in readme) == sorted((r[1], r[2]) for r in warm_sql)
    assert all(c[1] == "done" and c[2] == 2 for c in chain_rows(runner.sessions, warm))


def test_warm_start_refuses_a_source_it_cannot_map(
    sqlite_url: str, toy: tuple[str, str], tmp_path: Path
) -> None:
    upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))

    def make(name: str, run: bool = True, **kw: Any) -> None:
        cfg = parse_config(sweep_config(name, *toy, **{"prompts": 2, "steps": 1, **kw}))
        sweep_id, _ = create_sweep(sessions, cfg, check=False)
        if run:

            async def go() -> None:
                service = StepService(sessions)
                try:
                    await run_locally(service, sweep_id, progress=False)
                finally:
                    await service.close()

            asyncio.run(go())

    make("one", beta=1.0, chains=2)
    make("two", beta=[0.5, 1.0], chains=1)
    make("unfinished", run=False, beta=1.0, chains=2)

    def refused(source: str, **kw: Any) -> str:
        cfg = sweep_config("w", *toy, **{"prompts": 2, "steps": 1, "beta": 1.0, "chains": 1, **kw})
        with pytest.raises(ConfigError) as err:
            create_sweep(sessions, parse_config({**cfg, "warm_start": {"sweep": source}}),
                         check=False)  # fmt: skip
        return str(err.value)

    assert "no sweep 'nope'" in refused("nope")
    assert "'unfinished' is not finished: 2 of the chains" in refused("unfinished")
    assert "different dataset (2 prompts; this sweep 3)" in refused("one", prompts=3)
    assert "ambiguous" in refused("two", beta=[0.5, 1.0, 2.0])
    assert "generator model 'toy-lm', not 'toy-lm-b'" in refused(
        "one", generator={"urls": [toy[0]], "model": "toy-lm-b"}
    )
    assert "max_new_tokens 3, not 4" in refused("one", max_new_tokens=4)
    assert "1 chains per prompt, fewer than chains_per_prompt 2" in refused(
        "two", beta=[0.5, 1.0], chains=2
    )
    with sessions() as s:
        assert s.execute(select(Sweep.name).where(Sweep.name == "w")).first() is None
    # A grid of the source's size is matched run by run; a one-run source seeds every run.
    for source, beta in (("two", [2.0, 3.0]), ("one", [2.0, 3.0, 4.0])):
        cfg = sweep_config(f"w-{source}", *toy, prompts=2, steps=1, beta=beta, chains=1)
        cfg["warm_start"] = {"sweep": source}
        create_sweep(sessions, parse_config(cfg), check=False)
    with pytest.raises(ConfigError, match="warm_start is for qalign and quest"):
        parse_config({**sweep_config("a", *toy, method="ancestral"), "steps": 0,
                      "warm_start": {"sweep": "one"}})  # fmt: skip
    with pytest.raises(ConfigError, match="names this sweep itself"):
        parse_config({**sweep_config("a", *toy), "warm_start": {"sweep": "a"}})
    # Without the key, a sweep's fingerprint is the one it had before the key existed (the
    # value computed by the release before it): such sweeps still resume.
    plain = parse_config(sweep_config("p", "http://127.0.0.1:1", "http://127.0.0.1:2"))
    assert plain.fingerprint() == (
        "30f0732e5cec7aeb6e4a4ababc7c41de52456db92b2a60cf6b2f51e89f965f5d"
    )
