"""`qalign run` and Celery workers are one step service: every documented config key and flag
takes effect on both paths, and the same faults leave the same records.

`runner` runs each test twice: through `qalign run` (SQLite) and through `qalign sweep create`
+ `sweep run` served by a `qalign worker` (PostgreSQL, a private Redis). The effects are read
back from the database (and from the toy servers' counters), never from timing.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, func, select

from benchmarks.chaos import PrivateRedis
from qalign.storage.migrate import upgrade
from qalign.storage.models import Chain, Prompt, Proposal, Run, StepError, Sweep
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.runners import CeleryRunner, LocalRunner
from tests.stub_servers import proxy_app, serve_in_background
from tests.sweeps_support import ROOT, Broker, Worker, cli, sweep_config, workers

KEY_ENV = "QALIGN_TEST_RUNNER_KEY"
KEY = "runner-key-" + secrets.token_hex(8)


def set_faults(url: str, **changes: Any) -> None:
    req = urllib.request.Request(
        url + "/admin/faults",
        data=json.dumps(changes).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        resp.read()


# ---- the two runners -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def celery_db(pg_admin: Engine) -> Iterator[str]:
    from sqlalchemy import make_url

    from tests.conftest import PG_MAINTENANCE_URL

    name = f"qalign_test_{secrets.token_hex(6)}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(PG_MAINTENANCE_URL).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def celery_runner(
    celery_db: str, redis_server: PrivateRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryRunner]:
    upgrade(celery_db)
    # A database of the session's own Redis that this module keeps for itself (not a test's
    # number: the worker lives as long as the module).
    broker = Broker(redis_server.url, db=redis_server.databases - 1)
    broker.redis.flushdb()
    logs = tmp_path_factory.mktemp("worker")
    worker = Worker("runner@host", celery_db, broker, concurrency=8, env={KEY_ENV: KEY},
                    log_dir=logs)  # fmt: skip
    with workers(worker):
        yield CeleryRunner(celery_db, logs, broker, worker, env={KEY_ENV: KEY})


@pytest.fixture(params=["local", "celery"])
def runner(request: pytest.FixtureRequest, tmp_path: Path) -> LocalRunner | CeleryRunner:
    if request.param == "local":
        return LocalRunner(f"sqlite:///{tmp_path / 'run.sqlite'}", tmp_path, env={KEY_ENV: KEY})
    celery: CeleryRunner = request.getfixturevalue("celery_runner")
    celery.tmp = tmp_path
    return celery


@pytest.fixture
def servers() -> Iterator[Any]:
    """A fresh toy generator (serving two model names) and reward model: their handles."""
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm", "toy-lm-b"), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        yield g, r


def unique(runner: Any, stem: str) -> str:
    """Sweep names are unique per database; the Celery database is shared by the module."""
    return f"{stem}-{runner.name}-{secrets.token_hex(3)}"


# ---- reading a sweep back ------------------------------------------------------------------


def chains(runner: Any, sweep: str) -> list[Chain]:
    with runner.sessions() as s:
        return list(
            s.execute(
                select(Chain)
                .join(Run, Run.id == Chain.run_id)
                .join(Sweep, Sweep.id == Run.sweep_id)
                .where(Sweep.name == sweep)
                .order_by(Chain.rng_key)
            ).scalars()
        )


def proposals(runner: Any, sweep: str) -> list[tuple[Proposal, Chain, Run]]:
    with runner.sessions() as s:
        return [
            tuple(row)  # type: ignore[misc]
            for row in s.execute(
                select(Proposal, Chain, Run)
                .join(Chain, Chain.id == Proposal.chain_id)
                .join(Run, Run.id == Proposal.run_id)
                .join(Sweep, Sweep.id == Run.sweep_id)
                .where(Sweep.name == sweep)
                .order_by(Chain.rng_key, Proposal.step)
            ).all()
        ]


def errors(runner: Any, sweep: str) -> list[tuple[str, int, int, str, str]]:
    with runner.sessions() as s:
        rows = s.execute(
            select(
                Chain.rng_key, StepError.step, StepError.attempt, StepError.kind, StepError.error
            )
            .join(Chain, Chain.id == StepError.chain_id)
            .join(Run, Run.id == StepError.run_id)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(Sweep.name == sweep)
        ).all()
    return sorted(tuple(r) for r in rows)  # type: ignore[misc]


def prompts(runner: Any, sweep: str) -> list[Prompt]:
    with runner.sessions() as s:
        return list(
            s.execute(
                select(Prompt)
                .join(Sweep, Sweep.id == Prompt.sweep_id)
                .where(Sweep.name == sweep)
                .order_by(Prompt.prompt_index)
            ).scalars()
        )


# ---- the same faults, the same records -----------------------------------------------------


def _snapshot(runner: Any, sweep: str) -> dict[str, Any]:
    return {
        "chains": [
            (c.rng_key, c.status, c.attempts, c.current_step, c.last_error, c.state_tokens)
            for c in chains(runner, sweep)
        ],
        "step_errors": errors(runner, sweep),
        "proposals": [
            (c.rng_key, p.step, p.cut, list(p.new_tokens), p.accepted, p.reward, p.reject_reason)
            for p, c, _ in proposals(runner, sweep)
        ],
    }


def test_smc_takes_effect_alike_on_both_runners(
    servers: Any, celery_runner: CeleryRunner, tmp_path: Path
) -> None:
    """method: smc: `qalign run` and a worker store the same blocks, weights, barriers and
    ancestry (the barriers' wake-ups go through each runner's dispatcher)."""
    from sqlalchemy import select

    from qalign.storage.models import SmcAncestry, SmcResample

    g, r = servers
    local = LocalRunner(f"sqlite:///{tmp_path / 'local.sqlite'}", tmp_path)
    celery_runner.tmp = tmp_path
    views = []
    for run in (local, celery_runner):
        name = unique(run, "smc")
        cfg = sweep_config(name, g.url, r.url, prompts=3, beta=0.5, chains=4, max_new_tokens=4)
        cfg.pop("steps")
        cfg.update(method="smc", smc={"block_tokens": 1, "ess_threshold": 0.7})
        assert run.run(cfg).returncode == 0
        rows = proposals(run, name)
        keys = {c.id: c.rng_key for _, c, _ in rows}
        with run.sessions() as s:
            anc = sorted((keys[a.chain_id], a.block, keys[a.parent_chain_id], a.log_weight)
                         for a in s.execute(select(SmcAncestry)).scalars()
                         if a.chain_id in keys)  # fmt: skip
            runs = {run_id for _, _, run_obj in rows for run_id in (run_obj.id,)}
            barriers = sorted((b.block, b.particles, b.resampled, b.u)
                              for b in s.execute(select(SmcResample)).scalars()
                              if b.run_id in runs)  # fmt: skip
        stored = sorted((c.rng_key, p.step, p.cut, tuple(p.new_tokens), p.reward, p.log_weight)
                        for p, c, _ in rows)  # fmt: skip
        views.append((stored, anc, barriers, {c.status for _, c, _ in rows}))
    assert views[0] == views[1]
    stored, anc, barriers, statuses = views[0]
    assert statuses == {"done"} and len(stored) == 3 * 4 * 4
    assert len(barriers) == 3 * 3 and len(anc) == 3 * 4 * 3


def test_both_runners_meet_the_same_faults_with_the_same_records(
    servers: Any, celery_runner: CeleryRunner, tmp_path: Path
) -> None:
    """A generator that fails every third generation seed twice: `qalign run` and a worker
    record the same failed attempts (chain, step, attempt, kind, message), retry the same steps,
    fail the same chains after `max_attempts`, and commit the same proposals."""
    g, r = servers
    local = LocalRunner(f"sqlite:///{tmp_path / 'local.sqlite'}", tmp_path)
    celery_runner.tmp = tmp_path
    snapshots = []
    for run in (local, celery_runner):
        set_faults(g.url, seeded_errors=2, seeded_error_every=3)  # also restarts the counts
        for name, max_attempts, seed in (("recover", 3, 7), ("give-up", 2, 8)):
            cfg = sweep_config(name, g.url, r.url, prompts=3, beta=1.0, steps=4, chains=3)
            cfg["seed"] = seed
            cfg["generator"]["max_retries"] = 1  # one request per attempt: faults map to attempts
            cfg["execution"] = {"max_attempts": max_attempts}
            run.run(cfg)
        snapshots.append({n: _snapshot(run, n) for n in ("recover", "give-up")})
    local_view, celery_view = snapshots
    assert local_view == celery_view
    recover, give_up = local_view["recover"], local_view["give-up"]
    assert {status for _, status, *_ in recover["chains"]} == {"done"}
    assert recover["step_errors"] and {e[2] for e in recover["step_errors"]} == {1, 2}
    assert "failed" in {status for _, status, *_ in give_up["chains"]}
    for _, status, attempts, _, last_error, _ in give_up["chains"]:
        if status == "failed":
            assert attempts == 2 and "seed" in last_error and "fails its first 2" in last_error


STOP_WHEN = {"rhat": 1.2, "ess": 10, "min_steps": 8, "every": 4}


def _retired(runner: Any, sweep: str) -> dict[str, tuple[str, int]]:
    return {c.rng_key: (c.status, c.current_step) for c in chains(runner, sweep)}


def test_stop_when_takes_effect_alike_on_both_runners(
    servers: Any, celery_runner: CeleryRunner, tmp_path: Path
) -> None:
    """stop_when: `qalign run` and a worker retire the same prompts at the same checkpoint,
    with the same proposals; those are a prefix of the same sweep without stop_when, and each
    prompt retires at the first checkpoint where its chains' states 0..c pass the rule."""
    from qalign.core.stopping import StopRule, state_traces, verdict

    g, r = servers
    local = LocalRunner(f"sqlite:///{tmp_path / 'local.sqlite'}", tmp_path)
    celery_runner.tmp = tmp_path
    views = []
    for run in (local, celery_runner):
        name = unique(run, "stop")
        cfg = sweep_config(name, g.url, r.url, prompts=4, beta=1.0, steps=30, chains=3,
                           stop_when=STOP_WHEN)  # fmt: skip
        assert run.run(cfg).returncode == 0
        views.append((_retired(run, name), _snapshot(run, name)["proposals"]))
    (retired, stored), (celery_retired, celery_stored) = views
    assert retired == celery_retired and stored == celery_stored
    assert {status for status, _ in retired.values()} == {"converged", "done"}
    status_out = cli("sweep", "status", name, "--database", celery_runner.db_url, "--json")
    (row,) = json.loads(status_out.stdout)
    steps_at = {p["prompt_index"]: p["step"] for p in row["converged_prompts"]}
    assert row["prompts_converged"] == len(steps_at) and row["chains_converged"] == 3 * len(
        steps_at
    )

    full = sweep_config("no-stop", g.url, r.url, prompts=4, beta=1.0, steps=30, chains=3)
    assert local.run(full).returncode == 0
    fixed_rows = proposals(local, "no-stop")
    fixed = {(c.rng_key, p.step, p.cut, tuple(p.new_tokens), p.accepted, p.reward)
             for p, c, _ in fixed_rows}  # fmt: skip
    assert {(k, s, cut, tuple(new), a, rw) for k, s, cut, new, a, rw, _ in stored} <= fixed
    rule = StopRule(**STOP_WHEN)
    for prompt in range(4):
        keys = [f"0/{prompt}/{k}" for k in range(3)]
        rows = [(keys.index(c.rng_key), p.step, p.accepted, p.reward, p.response_len)
                for p, c, _ in fixed_rows if c.rng_key in keys]  # fmt: skip
        expected = None
        for c in range(rule.min_steps, 30, rule.every):
            if verdict(*state_traces(rows, c), rule).converged:
                expected = c
                break
        got = {retired[k] for k in keys}
        assert got == ({("converged", expected)} if expected is not None else {("done", 30)})
        assert steps_at.get(prompt) == expected


# ---- sampling keys -------------------------------------------------------------------------


def test_composite_reward_terms_are_scored_and_stored(runner: Any, servers: Any) -> None:
    """reward.terms: a weighted sum of two reward models, an LM log-likelihood and a constant;
    every proposal stores each term, and its reward is their weighted sum."""
    from qalign.toy.model import ToyModel

    toy, toy2 = ToyModel(), ToyModel(values={"yes": -1.0, "no": 1.0, "maybe": 0.0, "so": 0.5})
    g, r = servers
    with serve_in_thread(
        ToyServerOptions(served_model_names=("toy-rm2",), port=0, model=toy2)
    ) as r2:
        name = unique(runner, "terms")
        cfg = sweep_config(name, g.url, r.url, prompts=2, beta=1.0, steps=4, chains=2)
        cfg["reward"] = {
            "terms": [
                {"name": "rm", "weight": 0.5, "urls": [r.url], "model": "toy-rm", "format": "vllm"},
                {"name": "rm2", "weight": 1.5, "urls": r2.url, "model": "toy-rm2",
                 "format": "vllm"},
                {"name": "ref", "weight": 0.25, "kind": "lm_logprob", "urls": [g.url],
                 "model": "toy-lm"},
                {"name": "bias", "kind": "constant", "value": 2.0},
            ]
        }  # fmt: skip
        out = runner.run(cfg)
        assert out.returncode == 0, out.stderr
    rows = proposals(runner, name)
    assert len(rows) == 2 * 2 * 5 and all(c.status == "done" for _, c, _ in rows)
    weights = {"rm": 0.5, "rm2": 1.5, "ref": 0.25, "bias": 1.0}
    for p, _, run in rows:
        assert run.reward_model == "0.5*rm + 1.5*rm2 + 0.25*ref + 1*bias"
        if p.reward is None:
            continue
        words = tuple(toy.encode(p.text))
        exact = {
            "rm": toy.reward(words),
            "rm2": toy2.reward(words),
            "ref": toy.reply_logprob(words),
            "bias": 2.0,
        }
        assert p.reward_terms == pytest.approx(exact)
        assert p.reward == pytest.approx(sum(weights[k] * v for k, v in exact.items()))
    # the terms travel into the exports (a map column in Parquet, an object in JSONL)
    import pyarrow.parquet as pq

    from tests.sweeps_support import cli

    out_dir = runner.tmp / f"export-{name}"
    done = cli("export", name, "--database", runner.db_url, "-o", str(out_dir))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out_dir / "proposals.parquet", columns=["reward_terms"])
    first = table.column("reward_terms")[0].as_py()
    assert dict(first).keys() == weights.keys()
    line = json.loads((out_dir / "proposals.jsonl").read_text().splitlines()[0])
    assert line["reward_terms"].keys() == weights.keys()


def test_sampling_keys_take_effect(runner: Any, servers: Any) -> None:
    """beta and generator.model (grid axes), temperature, steps, chains_per_prompt, index,
    clamp, max_new_tokens, generator.urls (replicas) and dataset.prompts/system_prompt."""
    g, r = servers
    with serve_in_thread(ToyServerOptions(served_model_names=("toy-lm", "toy-lm-b"), port=0)) as g2:
        name = unique(runner, "sampling")
        cfg = sweep_config(name, g.url, r.url, prompts=2, beta=[0.5, 2.0], steps=3, chains=3)
        cfg["generator"]["urls"] = [g.url, g2.url]
        cfg["generator"]["model"] = ["toy-lm", "toy-lm-b"]
        cfg["dataset"]["system_prompt"] = "Be terse."
        cfg.update(temperature=0.7, index="block:2", clamp=0.3, max_new_tokens=4)
        out = runner.run(cfg)
        assert out.returncode == 0, out.stderr
        served = [g.metrics()["temperatures"], g2.metrics()["temperatures"]]
    with runner.sessions() as s:
        runs = s.execute(
            select(Run.beta, Run.generator_model, Run.steps)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(Sweep.name == name)
        ).all()
    assert sorted(runs) == [(b, m, 3) for b in (0.5, 2.0) for m in ("toy-lm", "toy-lm-b")]
    assert len(chains(runner, name)) == 4 * 2 * 3
    assert all(c.status == "done" and c.target_steps == 3 for c in chains(runner, name))
    system = {"role": "system", "content": "Be terse."}
    assert all(p.messages[0] == system for p in prompts(runner, name))
    rows = proposals(runner, name)
    assert len(rows) == 4 * 2 * 3 * 4
    # the temperature is what the generators were asked for, and both replicas served chains
    assert set().union(*served) == {"0.7"} and all(served)
    assert {p.endpoint for p, _, _ in rows} == {g.url, g2.url}
    previous: dict[int, Proposal] = {}
    for p, c, run in rows:
        assert p.response_len <= 4 and p.cut % 2 == 0  # max_new_tokens, block:2
        state = previous.get(c.id)
        if p.step > 0 and p.reject_reason is None and state is not None:
            # log A = (r' - r) / beta + log P(cut | y') - log P(cut | y), blocks of 2
            expected = (p.reward - state.reward) / run.beta
            expected += math.log(math.ceil(state.response_len / 2))
            expected -= math.log(math.ceil(p.response_len / 2))
            assert p.log_a == pytest.approx(expected, abs=1e-9)
            clamped = min(max(p.log_a, -0.3), 0.3)
            assert p.alpha == pytest.approx(min(1.0, math.exp(clamped)))
        if p.accepted:
            previous[c.id] = p


def test_methods_take_effect(runner: Any, servers: Any) -> None:
    """method: quest keeps the states' log-probabilities; ancestral draws independent samples."""
    g, r = servers
    quest = unique(runner, "quest")
    cfg = sweep_config(quest, g.url, r.url, prompts=1, beta=1.0, steps=2, chains=2)
    cfg["method"] = "quest"
    assert runner.run(cfg).returncode == 0
    assert all(c.state_logprobs and len(c.state_logprobs) == len(c.state_tokens)
               for c in chains(runner, quest))  # fmt: skip
    anc = unique(runner, "ancestral")
    cfg = sweep_config(anc, g.url, r.url, prompts=2, chains=5)
    cfg["method"] = "ancestral"
    del cfg["steps"], cfg["beta"]
    assert runner.run(cfg).returncode == 0
    got = chains(runner, anc)
    assert len(got) == 10 and all(c.target_steps == 0 and c.status == "done" for c in got)
    assert all(p.reward is not None for p, _, _ in proposals(runner, anc))


def test_power_sampling_runs_without_a_reward(runner: Any, servers: Any) -> None:
    """method: power with an alpha grid: no reward request, proposals stored with reward NULL
    and a log acceptance, states with their per-token log-probs."""
    g, r = servers
    name = unique(runner, "power")
    cfg = sweep_config(name, g.url, r.url, prompts=1, steps=3, chains=2, index="last_block:2")
    cfg["method"] = "power"
    cfg["alpha"] = [0.5, 4.0]
    del cfg["reward"], cfg["beta"]
    r.reset_metrics()
    out = runner.run(cfg)
    assert out.returncode == 0, out.stderr
    got = chains(runner, name)
    assert len(got) == 4 and all(c.status == "done" and c.current_step == 3 for c in got)
    assert all(c.state_logprobs and len(c.state_logprobs) == len(c.state_tokens) for c in got)
    rows = proposals(runner, name)
    assert len(rows) == 4 * 4
    assert all(p.reward is None for p, _, _ in rows)
    assert all(p.log_a is not None for p, _, _ in rows if p.reject_reason is None)
    runs = {run.name: run for _, _, run in rows}
    assert sorted(runs) == [
        "model=toy-lm,alpha=0.5,T=1,steps=3", "model=toy-lm,alpha=4,T=1,steps=3"
    ]  # fmt: skip
    assert all(run.beta is None and run.config["index"] == "last_block:2" for run in runs.values())
    assert sorted(run.config["alpha"] for run in runs.values()) == [0.5, 4.0]
    assert sum(r.metrics()["requests"].values()) == 0


def test_backend_and_reward_format_take_effect(runner: Any, servers: Any) -> None:
    """generator.backend and reward.format choose the protocol spoken."""
    g, r = servers
    for backend, fmt in (("sglang", "vllm-pooling"), ("vllm", "sglang"), ("vllm", "vllm")):
        g.reset_metrics()
        r.reset_metrics()
        name = unique(runner, f"proto-{backend}")
        cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=2, chains=2)
        cfg["generator"]["backend"] = backend
        if backend == "sglang":
            cfg["generator"]["template_url"] = g.url  # the toy also speaks vLLM's /tokenize
        cfg["reward"]["format"] = fmt
        out = runner.run(cfg)
        assert out.returncode == 0, out.stderr
        assert all(c.status == "done" for c in chains(runner, name))
        gen, rm = g.metrics()["requests"], r.metrics()["requests"]
        if backend == "sglang":
            assert gen["/generate"] >= 2 and gen["/v1/completions"] == 0, gen
        else:
            assert gen["/v1/completions"] >= 2 and gen["/generate"] == 0, gen
        if fmt == "vllm-pooling":
            assert rm["/pooling"] >= 1 and rm["/classify"] == 0, rm
        else:
            assert rm["/classify"] >= 1 and rm["/pooling"] == 0, rm
            # SGLang's reward client asks for the model info; vLLM's does not
            assert (rm["/get_model_info"] > 0) == (fmt == "sglang"), rm
        rewards = {p.reward for p, _, _ in proposals(runner, name)}
        assert all(x is not None and math.isfinite(x) for x in rewards), rewards


# ---- transport and execution keys ----------------------------------------------------------


def test_retries_and_attempts_take_effect(runner: Any, servers: Any) -> None:
    """generator.max_retries (requests per attempt) and execution.max_attempts (attempts per
    step), against a generator that answers 503 to everything."""
    g, r = servers
    name = unique(runner, "attempts")
    cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=2, chains=2)
    cfg["generator"]["max_retries"] = 3
    cfg["execution"] = {"max_attempts": 2}
    set_faults(g.url, error_rate=1.0)
    g.reset_metrics()
    out = runner.run(cfg)
    assert all(c.status == "failed" and c.attempts == 2 for c in chains(runner, name))
    assert [e[1:4] for e in errors(runner, name)] == [(0, a, "ServerUnavailableError")
                                                     for a in (1, 2, 1, 2)]  # fmt: skip
    assert g.metrics()["requests"]["/v1/completions"] == 2 * 2 * 3
    if runner.name == "local":
        assert out.returncode != 0 and "execution.max_attempts=2" in out.stderr


def test_timeouts_take_effect(runner: Any, servers: Any) -> None:
    """generator.timeout ends a request; execution.stall_timeout ends a step that takes longer,
    even when the client would go on retrying."""
    g, r = servers
    set_faults(g.url, hang_rate=1.0, hang_seconds=120.0)
    short = unique(runner, "timeout")
    cfg = sweep_config(short, g.url, r.url, prompts=1, beta=1.0, steps=1, chains=1)
    cfg["generator"].update(timeout=0.5, max_retries=1)
    cfg["execution"] = {"max_attempts": 1}
    runner.run(cfg)
    ((_, _, _, kind, message),) = errors(runner, short)
    assert kind == "ServerUnavailableError" and message.endswith("last cause: TimeoutError")
    stalled = unique(runner, "stall")
    cfg = sweep_config(stalled, g.url, r.url, prompts=1, beta=1.0, steps=1, chains=1)
    cfg["generator"].update(timeout=60.0, max_retries=8)
    cfg["execution"] = {"max_attempts": 1, "stall_timeout": 1.0}
    runner.run(cfg)
    ((_, _, _, kind, message),) = errors(runner, stalled)
    assert kind == "StepStalledError" and "stall_timeout=1 s" in message


def test_reward_retries_and_timeout_take_effect(runner: Any, servers: Any) -> None:
    """reward.max_retries (requests per attempt) and reward.timeout (end of one request)."""
    g, r = servers
    set_faults(r.url, error_rate=1.0)
    r.reset_metrics()
    name = unique(runner, "rm-retries")
    cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=1, chains=1)
    cfg["reward"]["max_retries"] = 3
    cfg["execution"] = {"max_attempts": 2}
    runner.run(cfg, "--no-check")  # the server check would meet the fault first
    assert [e[1:4] for e in errors(runner, name)] == [(0, 1, "ServerUnavailableError"),
                                                     (0, 2, "ServerUnavailableError")]  # fmt: skip
    assert r.metrics()["requests"]["/classify"] == 2 * 3
    set_faults(r.url, error_rate=0.0, hang_rate=1.0, hang_seconds=120.0)
    name = unique(runner, "rm-timeout")
    cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=1, chains=1)
    cfg["reward"].update(timeout=0.5, max_retries=1)
    cfg["execution"] = {"max_attempts": 1}
    runner.run(cfg, "--no-check")
    ((_, _, _, kind, message),) = errors(runner, name)
    assert kind == "ServerUnavailableError" and message.endswith("last cause: TimeoutError")


def test_concurrency_takes_effect(runner: Any) -> None:
    """execution.concurrency caps the sweep's steps at the servers, per process."""
    slow = ToyServerOptions(served_model_names=("toy-lm",), port=0, latency_base=0.2)
    with (
        serve_in_thread(slow) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        name = unique(runner, "concurrency")
        cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=2, chains=8)
        cfg["execution"] = {"concurrency": 2}
        assert runner.run(cfg).returncode == 0
        assert g.metrics()["peak_running_sequences"] == 2


def test_prompt_and_vocabulary_limits_take_effect(runner: Any, servers: Any) -> None:
    """max_prompt_length fails a prompt's chains at once; generator.vocab_size refuses token ids
    outside the vocabulary."""
    g, r = servers
    name = unique(runner, "limits")
    cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=1, chains=2)
    cfg["dataset"] = {"prompts": ["short?", "a much longer question " * 20]}
    cfg["max_prompt_length"] = 24
    runner.run(cfg)
    by_prompt: dict[int, set[str]] = {}
    for c in chains(runner, name):
        by_prompt.setdefault(c.prompt_id, set()).add(c.status)
        if c.status == "failed":
            assert c.attempts == 1 and "over max_prompt_length=24" in (c.last_error or "")
    assert sorted(map(sorted, by_prompt.values())) == [["done"], ["failed"]]
    vocab = unique(runner, "vocab")
    cfg = sweep_config(vocab, g.url, r.url, prompts=1, beta=1.0, steps=3, chains=4)
    cfg["generator"]["vocab_size"] = 11  # the toy's words other than "yes" are ids 11-13
    cfg["execution"] = {"max_attempts": 1}
    runner.run(cfg)
    kinds = {e[3] for e in errors(runner, vocab)}
    assert kinds == {"ProtocolError"}
    assert all("vocab" in e[4] for e in errors(runner, vocab))


def test_api_keys_take_effect(runner: Any, servers: Any, tmp_path: Path) -> None:
    """api_key_env and api_key_file: the key reaches the server as a bearer token."""
    g, r = servers
    seen: list[str] = []
    key_file = tmp_path / "rm.key"
    key_file.write_text(f"{KEY}\n")
    with (
        serve_in_background(proxy_app(g.url, require_key=KEY, seen_auth=seen)) as gen,
        serve_in_background(proxy_app(r.url, require_key=KEY, seen_auth=seen)) as rm,
    ):
        name = unique(runner, "keys")
        cfg = sweep_config(name, gen, rm, prompts=1, beta=1.0, steps=1, chains=1)
        cfg["generator"]["api_key_env"] = KEY_ENV
        cfg["reward"]["api_key_file"] = str(key_file)
        out = runner.run(cfg)
        assert out.returncode == 0, out.stderr
    assert all(c.status == "done" for c in chains(runner, name))
    assert seen and set(seen) == {f"Bearer {KEY}"}


def test_dataset_keys_take_effect(runner: Any, servers: Any, tmp_path: Path) -> None:
    """dataset.path, prompt_field, answer_field, limit, shuffle_seed (and chains_per_prompt)."""
    g, r = servers
    data = tmp_path / "questions.jsonl"
    data.write_text(
        "".join(json.dumps({"q": f"question {i}?", "a": str(i)}) + "\n" for i in range(20))
    )
    name = unique(runner, "dataset")
    cfg = sweep_config(name, g.url, r.url, chains=2)
    cfg["method"] = "ancestral"
    del cfg["steps"], cfg["beta"]
    cfg["dataset"] = {
        "path": str(data), "prompt_field": "q", "answer_field": "a", "limit": 4,
        "shuffle_seed": 5,
    }  # fmt: skip
    assert runner.run(cfg).returncode == 0
    got = prompts(runner, name)
    assert len(got) == 4 and len(chains(runner, name)) == 8
    indices = [int(p.reference) for p in got]
    assert indices != [0, 1, 2, 3] and len(set(indices)) == 4
    assert all(p.messages[-1]["content"] == f"question {p.reference}?" for p in got)


# ---- the documentation's keys and flags all have a test ------------------------------------

# Every key of the README's config reference and every flag of its commands, with the tests
# that show it takes effect (on both paths where both have it).
SECURITY = "test_security.py::test_api_keys_are_sent_as_bearer_and_never_stored_logged_or_printed"
CELERY = "test_sweeps_celery.py::"
COVERED = {
    "name": "test_runners.py::test_sampling_keys_take_effect",
    "method": "test_runners.py::test_methods_take_effect",
    "generator.backend": "test_runners.py::test_backend_and_reward_format_take_effect",
    "generator.urls": "test_runners.py::test_sampling_keys_take_effect",
    "generator.model": "test_runners.py::test_sampling_keys_take_effect",
    "generator.timeout": "test_runners.py::test_timeouts_take_effect",
    "generator.max_retries": "test_runners.py::test_retries_and_attempts_take_effect",
    "generator.api_key_env": "test_runners.py::test_api_keys_take_effect",
    "generator.api_key_file": SECURITY,
    "generator.vocab_size": "test_runners.py::test_prompt_and_vocabulary_limits_take_effect",
    "generator.template_url": "test_runners.py::test_backend_and_reward_format_take_effect",
    "reward.format": "test_runners.py::test_backend_and_reward_format_take_effect",
    "reward.urls": "test_runners.py::test_sampling_keys_take_effect",
    "reward.model": "test_runners.py::test_sampling_keys_take_effect",
    "reward.batch_size": "test_runners.py::test_reward_batch_size_takes_effect_when_scoring",
    "reward.timeout": "test_runners.py::test_reward_retries_and_timeout_take_effect",
    "reward.max_retries": "test_runners.py::test_reward_retries_and_timeout_take_effect",
    "reward.api_key_env": SECURITY,
    "reward.api_key_file": "test_runners.py::test_api_keys_take_effect",
    "reward.terms": "test_runners.py::test_composite_reward_terms_are_scored_and_stored",
    "dataset.task": "test_tasks_load.py",
    "dataset.path": "test_runners.py::test_dataset_keys_take_effect",
    "dataset.subset": "test_tasks_load.py",
    "dataset.options": "test_tasks_load.py",
    "dataset.split": "test_tasks_load.py",
    "dataset.limit": "test_runners.py::test_dataset_keys_take_effect",
    "dataset.shuffle_seed": "test_runners.py::test_dataset_keys_take_effect",
    "dataset.system_prompt": "test_runners.py::test_sampling_keys_take_effect",
    "dataset.prompt_field": "test_runners.py::test_dataset_keys_take_effect",
    "dataset.answer_field": "test_runners.py::test_dataset_keys_take_effect",
    "dataset.prompts": "test_runners.py::test_sampling_keys_take_effect",
    "beta": "test_runners.py::test_sampling_keys_take_effect",
    "alpha": "test_runners.py::test_power_sampling_runs_without_a_reward",
    "temperature": "test_runners.py::test_sampling_keys_take_effect",
    "steps": "test_runners.py::test_sampling_keys_take_effect",
    "chains_per_prompt": "test_runners.py::test_sampling_keys_take_effect",
    "seed": "test_runners.py::test_both_runners_meet_the_same_faults_with_the_same_records",
    "index": "test_runners.py::test_sampling_keys_take_effect",
    "clamp": "test_runners.py::test_sampling_keys_take_effect",
    "max_new_tokens": "test_runners.py::test_sampling_keys_take_effect",
    "max_prompt_length": "test_runners.py::test_prompt_and_vocabulary_limits_take_effect",
    "stop_when": "test_runners.py::test_stop_when_takes_effect_alike_on_both_runners",
    "smc": "test_smc.py::test_smc_runs_have_one_step_per_block_and_store_their_settings",
    "warm_start": "test_extend.py::"
    + "test_warm_start_begins_each_chain_at_the_source_chains_final_state",
    "execution.concurrency": "test_runners.py::test_concurrency_takes_effect",
    "execution.max_attempts": "test_runners.py::test_retries_and_attempts_take_effect",
    "execution.stall_timeout": "test_runners.py::test_timeouts_take_effect",
    "qalign run --concurrency": "test_runners.py::test_run_flags_take_effect",
    "qalign run --retry-failed": "test_runners.py::test_retry_failed_takes_effect",
    "qalign run --no-check": "test_runners.py::test_run_flags_take_effect",
    "qalign sweep create --no-check": "test_runners.py::"
    + "test_a_key_file_of_two_lines_is_a_recorded_failure",
    "qalign run --quiet": "test_runners.py::test_run_flags_take_effect",
    "qalign run --lockstep": "test_sweeps_local.py::test_lockstep_mode_gives_the_same_chains",
    "qalign sweep resume --retry-failed": "test_runners.py::test_retry_failed_takes_effect",
    "qalign sweep extend --steps": "test_extend.py::"
    + "test_extension_equals_a_fresh_run_proposal_for_proposal",
    "qalign sweep extend --local": "test_extend.py::"
    + "test_an_interrupted_extension_resumes_to_the_same_chains",
    "qalign sweep extend --run": "test_extend.py::"
    + "test_extend_refuses_what_it_cannot_do_and_extends_only_the_runs_named",
    "qalign sweep extend --no-enqueue": "test_extend.py::"
    + "test_extend_refuses_what_it_cannot_do_and_extends_only_the_runs_named",
    "qalign sweep reap --stall-timeout": "test_runners.py::"
    + "test_reaper_uses_each_sweeps_stall_timeout",
    "qalign worker --concurrency": "test_runners.py::test_worker_flags_take_effect",
    "qalign worker --name": CELERY + "test_sweep_end_to_end_with_two_named_workers",
    "qalign worker --steps-per-task": CELERY + "test_a_task_runs_several_steps_of_its_chain",
    "qalign worker --task-budget": "test_runners.py::test_worker_flags_take_effect",
    "qalign worker --hand-on": CELERY + "test_a_task_runs_several_steps_of_its_chain",
    "qalign worker --queue": "test_runners.py::test_worker_flags_take_effect",
    "qalign worker --db-wait": "test_chaos.py::"
    + "test_worker_started_while_the_database_restarts_waits_for_it",
}


def _readme_config_keys() -> set[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("The full config, with every key and its default")[1]
    yaml_text = block.split("```yaml", 1)[1].split("```", 1)[0]
    keys: set[str] = set()
    for line in yaml_text.splitlines():
        m = re.match(r"^(\s*)(?:#\s*)?([a-z_]+):", line)
        if m is None:
            continue
        depth = len(m.group(1)) // 2
        if depth == 0:
            parent = m.group(2)
            keys.add(parent)
        else:
            keys.discard(parent)
            keys.add(f"{parent}.{m.group(2)}")
    return keys


def test_every_documented_key_and_flag_has_a_test() -> None:
    documented = _readme_config_keys()
    assert {"generator.timeout", "execution.stall_timeout", "beta"} <= documented
    missing = sorted(documented - set(COVERED))
    assert missing == [], f"README config keys without a test: {missing}"
    for key, where in COVERED.items():
        file, _, test = where.partition("::")
        source = (ROOT / "tests" / file).read_text()
        assert not test or f"def {test}(" in source, (key, where)


# ---- flags ---------------------------------------------------------------------------------


def test_reward_batch_size_takes_effect_when_scoring(servers: Any, tmp_path: Path) -> None:
    """A step scores one conversation; `qalign score` sends reward.batch_size at a time."""
    g, r = servers
    local = LocalRunner(f"sqlite:///{tmp_path / 'b.sqlite'}", tmp_path)
    cfg = sweep_config("batches", g.url, r.url, prompts=1, chains=12)
    cfg["method"] = "ancestral"
    cfg["reward"]["batch_size"] = 5
    del cfg["steps"], cfg["beta"]
    assert local.run(cfg).returncode == 0
    r.reset_metrics()
    from tests.sweeps_support import cli

    out = cli("score", "batches", "--database", local.db_url, "--force")
    assert out.returncode == 0, out.stderr
    distinct = int(re.findall(r"(\d+) distinct", out.stdout)[0])
    with_section = r.metrics()["requests"]["/classify"]
    r.reset_metrics()
    url = ["--reward-url", r.url, "--reward-model", "toy-rm", "--reward-format", "vllm"]
    out = cli("score", "batches", "--database", local.db_url, "--force", *url)  # batches of 32
    assert out.returncode == 0, out.stderr
    # the same start-up probes either way; the sweep's batch_size splits the scoring requests
    assert with_section - r.metrics()["requests"]["/classify"] == math.ceil(distinct / 5) - 1
    assert distinct > 5


def test_run_flags_take_effect(servers: Any, tmp_path: Path) -> None:
    """`qalign run --concurrency` overrides execution.concurrency; --no-check writes without
    contacting the servers; without --quiet the progress bars show."""
    from tests.sweeps_support import cli

    slow = ToyServerOptions(served_model_names=("toy-lm",), port=0, latency_base=0.2)
    _, r = servers
    with serve_in_thread(slow) as g:
        local = LocalRunner(f"sqlite:///{tmp_path / 'f.sqlite'}", tmp_path)
        cfg = sweep_config("flags", g.url, r.url, prompts=1, beta=1.0, steps=1, chains=6)
        cfg["execution"] = {"concurrency": 5}
        out = local.run(cfg, "--concurrency", "1")
        assert out.returncode == 0, out.stderr
        assert "%|" not in out.stderr  # --quiet
        assert g.metrics()["peak_running_sequences"] == 1
        loud = cli("run", str(tmp_path / "flags.yaml"), "--database", local.db_url)
        assert loud.returncode == 0 and "%|" in loud.stderr  # a progress bar per run
    unreachable = sweep_config("nocheck", "http://127.0.0.1:9", r.url, prompts=1, steps=1)
    unreachable["generator"].update(max_retries=1, timeout=2.0)
    unreachable["execution"] = {"max_attempts": 1}
    checked = local.run(unreachable)
    assert checked.returncode != 0 and "created sweep" not in checked.stderr
    unchecked = local.run(unreachable, "--no-check")
    assert "created sweep 'nocheck'" in unchecked.stderr  # written, then its steps failed
    assert {c.status for c in chains(local, "nocheck")} == {"failed"}


def test_retry_failed_takes_effect(runner: Any, servers: Any) -> None:
    """Chains that ran out of attempts run again with `qalign run --retry-failed` (embedded) or
    `qalign sweep resume --retry-failed` (workers)."""
    g, r = servers
    name = unique(runner, "revive")
    cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=2, chains=2)
    cfg["generator"]["max_retries"] = 1
    cfg["execution"] = {"max_attempts": 1}
    set_faults(g.url, error_rate=1.0)
    runner.run(cfg)
    assert {c.status for c in chains(runner, name)} == {"failed"}
    set_faults(g.url, error_rate=0.0)
    if isinstance(runner, LocalRunner):
        assert runner.run(cfg).returncode != 0  # without the flag failed chains stay failed
        assert {c.status for c in chains(runner, name)} == {"failed"}
        assert runner.run(cfg, "--retry-failed").returncode == 0
    else:
        from tests.sweeps_support import cli

        env = runner.broker.env()
        out = cli("sweep", "resume", name, "--database", runner.db_url, "--retry-failed", env=env)
        assert out.returncode == 0 and "enqueued 2" in out.stdout, out.stderr
        runner.wait_settled(name, 240)
    assert {c.status for c in chains(runner, name)} == {"done"}


def test_reaper_uses_each_sweeps_stall_timeout(celery_runner: CeleryRunner, servers: Any) -> None:
    """`qalign sweep reap` re-enqueues a chain once it is idle for its own sweep's
    execution.stall_timeout; --stall-timeout overrides that for every sweep."""
    import datetime as dt

    from sqlalchemy import update

    from tests.sweeps_support import cli

    g, r = servers
    run = celery_runner
    names = {}
    for stall in (60.0, 3600.0):
        names[stall] = unique(run, f"reap{int(stall)}")
        cfg = sweep_config(names[stall], g.url, r.url, prompts=1, beta=1.0, steps=1, chains=1)
        cfg["execution"] = {"stall_timeout": stall}
        out = cli("sweep", "create", str(_write(run.tmp, cfg)), "--database", run.db_url)
        assert out.returncode == 0, out.stderr
    ids = {stall: [c.id for c in chains(run, name)] for stall, name in names.items()}
    with run.sessions.begin() as s:  # both chains untouched for 10 minutes
        s.execute(
            update(Chain)
            .where(Chain.id.in_(ids[60.0] + ids[3600.0]))
            .values(updated_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10))
        )
    env = run.broker.env()
    reaped = cli("sweep", "reap", "--database", run.db_url, env=env)
    assert reaped.returncode == 0 and "re-enqueued 1 " in reaped.stdout, reaped.stdout
    run.wait_settled(names[60.0], 240)
    assert [c.status for c in chains(run, names[3600.0])] == ["pending"]
    forced = cli("sweep", "reap", "--database", run.db_url, "--stall-timeout", "0", env=env)
    assert forced.returncode == 0 and "re-enqueued 1 " in forced.stdout, forced.stdout
    run.wait_settled(names[3600.0], 240)


def _write(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_worker_flags_take_effect(
    servers: Any, celery_db: str, broker: Broker, tmp_path: Path
) -> None:
    """`qalign worker --concurrency` caps the worker's threads, --queue chooses what it
    consumes, and --task-budget bounds how long a task keeps a chain."""
    from tests.sweeps_support import cli

    slow = ToyServerOptions(served_model_names=("toy-lm",), port=0, latency_base=0.2)
    _, r = servers
    other_queue = broker.env() | {"QALIGN_QUEUE": broker.queue + "-other"}
    with serve_in_thread(slow) as g:
        name = f"wflags-{secrets.token_hex(3)}"
        cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=3, chains=6)
        cfg["execution"] = {"concurrency": 64}
        out = cli("sweep", "create", str(_write(tmp_path, cfg)), "--database", celery_db)
        assert out.returncode == 0, out.stderr
        sent = cli("sweep", "run", name, "--database", celery_db, env=other_queue)
        assert "enqueued 6" in sent.stdout, sent.stderr
        w = Worker("flags@host", celery_db, broker, concurrency=2,
                   args=("--task-budget", "0.001", "--hand-on", "always"),
                   log_dir=tmp_path)  # fmt: skip
        with workers(w):
            # the worker consumes its own queue only: nothing moves until its queue gets hints
            runner = CeleryRunner(celery_db, tmp_path, broker, w)
            assert broker.queued() == 0
            sent = cli("sweep", "run", name, "--database", celery_db, env=broker.env())
            assert "enqueued 6" in sent.stdout, sent.stderr
            runner.wait_settled(name, 240)
            received = [
                ln
                for ln in w.output().splitlines()
                if "Task qalign.step[" in ln and "received" in ln
            ]
        assert g.metrics()["peak_running_sequences"] == 2  # the worker's two threads
    assert len(received) >= 6 * 4  # a budget of ~0 s: one step per task
    with runner.sessions() as s:
        n = s.execute(
            select(func.count()).select_from(Proposal).where(Proposal.worker == "flags@host")
        ).scalar()
    assert n == 6 * 4
    import redis as redis_lib

    leftover = redis_lib.Redis.from_url(broker.url)
    assert leftover.llen(broker.queue + "-other") == 6  # never consumed by this worker
    leftover.close()  # the `broker` fixture empties its database


# ---- a step's trouble stays that chain's ---------------------------------------------------

MAYBE = 12  # the toy's token id of "maybe"


def _huge_scores_for_maybe(upstream: str) -> Any:
    """A reward proxy answering an integer too large for a float for every conversation that
    contains "maybe", and the true score otherwise."""
    import aiohttp
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, upstream + request.path_qs, data=body,
                            headers={"Content-Type": "application/json"}) as resp,
        ):  # fmt: skip
            raw, status = await resp.read(), resp.status
        if request.path == "/classify" and status == 200:
            inputs = json.loads(body).get("input") or []
            answer = json.loads(raw)
            for item, ids in zip(answer["data"], inputs, strict=True):
                if MAYBE in ids:
                    item["probs"] = [10**400]
            raw = json.dumps(answer).encode()
        return web.Response(body=raw, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def test_a_bad_answer_fails_only_the_chain_that_got_it(runner: Any, servers: Any) -> None:
    """An integer reward too large for a float (a server bug) is recorded against the chain
    whose response was scored, and only that chain: the others finish, and `qalign run` ends
    with one clean line, not a traceback."""
    g, r = servers
    with serve_in_background(_huge_scores_for_maybe(r.url)) as rm:
        name = unique(runner, "huge")
        cfg = sweep_config(name, g.url, rm, prompts=2, beta=1.0, steps=3, chains=6)
        cfg["reward"]["max_retries"] = 1
        cfg["execution"] = {"max_attempts": 1}
        out = runner.run(cfg)
    assert "Traceback" not in out.stderr + out.stdout
    got = chains(runner, name)
    failed = [c for c in got if c.status == "failed"]
    assert failed and len(failed) < len(got), [c.status for c in got]
    assert all(c.status == "done" for c in got if c not in failed)
    rows = errors(runner, name)
    assert len(rows) == len(failed)  # one failed attempt per failed chain, none elsewhere
    assert {kind for *_, kind, _ in rows} == {"ProtocolError"}
    assert all("too large for a float" in e[4] for e in rows)
    for c in got:  # every committed state of a finished chain came without a huge score
        if c.status == "done":
            assert c.state_reward is not None and math.isfinite(c.state_reward)
    if runner.name == "local":
        assert out.returncode == 1 and "chain(s) failed" in out.stderr


def test_a_key_file_of_two_lines_is_a_recorded_failure(
    runner: Any, servers: Any, tmp_path: Path
) -> None:
    """A key file whose key would break the HTTP header is refused by name, as a failed attempt
    of each step that needs it (not an exception that stops the runner)."""
    g, r = servers
    key_file = tmp_path / "two-lines.key"
    key_file.write_text("first-part\nsecond-part\n")
    name = unique(runner, "newline-key")
    cfg = sweep_config(name, g.url, r.url, prompts=1, beta=1.0, steps=1, chains=2)
    cfg["generator"]["api_key_file"] = str(key_file)
    cfg["execution"] = {"max_attempts": 1}
    out = runner.run(cfg, "--no-check")
    assert "Traceback" not in out.stderr + out.stdout
    assert {c.status for c in chains(runner, name)} == {"failed"}
    rows = errors(runner, name)
    assert len(rows) == 2 and {e[3] for e in rows} == {"CredentialsError"}
    assert all("whitespace or a control character" in e[4] for e in rows)


# ---- wall-clock cost -----------------------------------------------------------------------


def test_latency_columns_are_filled_on_both_runners(runner: Any) -> None:
    """Every proposal stores its generator, reward and queue seconds. The toy servers sleep a
    fixed time per sequence, a lower bound of what a step must have measured; a reward the
    process's cache already held costs 0."""
    gen_delay, rm_delay = 0.05, 0.03
    with (
        serve_in_thread(
            ToyServerOptions(served_model_names=("toy-lm",), port=0, latency_base=gen_delay)
        ) as g,
        serve_in_thread(
            ToyServerOptions(served_model_names=("toy-rm",), port=0, latency_base=rm_delay)
        ) as r,
    ):
        name = unique(runner, "latency")
        cfg = sweep_config(name, g.url, r.url, prompts=2, beta=1.0, steps=4, chains=2)
        assert runner.run(cfg).returncode == 0
    rows = proposals(runner, name)
    assert len(rows) == 2 * 2 * 5
    for p, _, _ in rows:
        assert p.generator_seconds is not None and p.generator_seconds >= gen_delay
        assert p.queue_seconds is not None and p.queue_seconds >= 0.0
        assert p.reward_seconds is not None
        assert p.reward_seconds == 0.0 or p.reward_seconds >= rm_delay
    # Each step's first scoring of a response asks the server (the cache cannot know it yet).
    assert any(p.reward_seconds >= rm_delay for p, _, _ in rows)
