"""`stop_when`: the pure rule, the config key, and what `sweep status` shows of retired chains;
and run names in text tables (never cut mid-value). The two runners are compared in
tests/test_runners.py::test_stop_when_takes_effect_alike_on_both_runners."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from qalign.analysis.names import run_columns, text_table
from qalign.cli import main
from qalign.config import ConfigError, parse_config
from qalign.core.stopping import StopRule, state_traces, verdict
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.service import StepService
from qalign.storage import ensure_schema, make_engine, make_sessionmaker
from qalign.storage.models import Chain
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.sweeps_support import sweep_config

RULE = StopRule(rhat=1.05, ess=20, min_steps=8, every=4)


# ---- the rule ------------------------------------------------------------------------------


def test_checkpoints_start_at_min_steps_and_repeat_every_k_steps() -> None:
    assert [s for s in range(30) if RULE.is_checkpoint(s)] == [8, 12, 16, 20, 24, 28]
    assert StopRule.from_config(RULE.to_config()) == RULE
    assert StopRule.from_config({"rhat": 1.01, "ess": 400}) == StopRule(1.01, 400, 20, 5)
    assert StopRule.from_config(None) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rhat": 1.0, "ess": 1}, "rhat must be a finite number > 1"),
        ({"rhat": math.inf, "ess": 1}, "rhat must be a finite number > 1"),
        ({"rhat": 1.1, "ess": 0}, "ess must be a finite number > 0"),
        ({"rhat": 1.1, "ess": 1, "min_steps": 2}, "min_steps must be >= 3"),
        ({"rhat": 1.1, "ess": 1, "every": 0}, "every must be >= 1"),
    ],
)
def test_a_rule_refuses_values_it_cannot_use(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StopRule(**kwargs)


def test_state_traces_follow_accepted_proposals_up_to_the_checkpoint() -> None:
    rows = [
        (7, 0, True, 1.0, 3), (7, 1, False, 9.0, 9), (7, 2, True, 2.0, 4), (7, 3, True, 5.0, 5),
        (3, 0, True, None, 2), (3, 1, True, 0.5, 1), (3, 2, False, 0.0, 0),
    ]  # fmt: skip
    rewards, lengths = state_traces(rows, upto=2)
    assert rewards[0] == [1.0, 1.0, 2.0] and lengths[0] == [3.0, 3.0, 4.0]
    assert math.isnan(rewards[1][0]) and rewards[1][1:] == [0.5, 0.5]


def test_mixed_chains_converge_stuck_ones_and_unscored_states_do_not() -> None:
    rng = np.random.default_rng(0)
    mixed = rng.normal(size=(4, 200)).tolist()
    lengths = [[3.0] * 200] * 4  # constant everywhere: nothing to mix, it passes
    v = verdict(mixed, lengths, RULE)
    assert v.converged and v.rhat["reward"] < 1.05 and v.ess_bulk["reward"] >= 20
    assert math.isnan(v.rhat["length"])
    stuck = [[float(i)] * 200 for i in range(4)]  # each chain at its own value: R-hat inf
    assert not verdict(stuck, lengths, RULE).converged
    assert not verdict(mixed, [[1.0] * 200, *([[2.0] * 200] * 3)], RULE).converged
    unscored = [row[:] for row in mixed]
    unscored[0][5] = math.nan
    assert not verdict(unscored, lengths, RULE).converged
    short = [r[:3] for r in mixed]  # fewer than 4 draws: no R-hat
    assert not verdict(short, [r[:3] for r in lengths], RULE).converged
    with pytest.raises(ValueError, match=">= 2 chains"):
        verdict(mixed[:1], lengths[:1], RULE)


# ---- the config key ------------------------------------------------------------------------


def _cfg(**extra: Any) -> dict[str, Any]:
    cfg = {
        "name": "fp",
        "generator": {"urls": ["http://127.0.0.1:1"], "model": "toy-lm"},
        "reward": {"urls": ["http://127.0.0.1:2"], "model": "toy-rm"},
        "dataset": {"prompts": ["a?"]},
        "chains_per_prompt": 2,
        "steps": 5,
    }
    return cfg | extra


def test_a_config_without_stop_when_keeps_its_fingerprint_and_run_config() -> None:
    # the fingerprint this config had before the key existed
    old = "6b6f5de73af625cd06caa414b385cb1bc6d6c25405ab50afa18912d16ee10d8d"
    assert parse_config(_cfg()).fingerprint() == old
    assert parse_config(_cfg(stop_when=None)).fingerprint() == old
    assert "stop_when" not in parse_config(_cfg()).runs()[0].to_config()
    with_rule = parse_config(_cfg(stop_when={"rhat": 1.01, "ess": 400}))
    assert with_rule.fingerprint() != old
    (run,) = with_rule.runs()
    assert run.stop_when == StopRule(1.01, 400, 20, 5)
    assert run.to_config()["stop_when"] == {"rhat": 1.01, "ess": 400, "min_steps": 20, "every": 5}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stop_when": {"rhat": 1.0, "ess": 4}}, "stop_when.rhat: Input should be greater than 1"),
        ({"stop_when": {"rhat": 1.01, "ess": 0}}, "stop_when.ess: Input should be greater than 0"),
        ({"stop_when": {"rhat": 1.01}}, "stop_when.ess: required key is missing"),
        ({"stop_when": {"rhat": 1.01, "ess": 9, "min_steps": 1}}, "stop_when.min_steps"),
        ({"stop_when": {"rhat": 1.01, "ess": 9, "every": 0}}, "stop_when.every"),
        ({"stop_when": {"rhat": 1.01, "ess": 9, "stop": 1}}, "stop_when.stop: unknown key"),
        ({"stop_when": {"rhat": 1.1, "ess": 9}, "chains_per_prompt": 1},
         "stop_when needs chains_per_prompt >= 2"),
        ({"stop_when": {"rhat": 1.1, "ess": 9}, "method": "ancestral", "steps": None},
         "stop_when is for qalign and quest chains"),
    ],
)  # fmt: skip
def test_stop_when_is_validated_by_key(extra: dict[str, Any], message: str) -> None:
    cfg = _cfg(**extra)
    if cfg.get("steps") is None:
        del cfg["steps"]
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)


# ---- names ---------------------------------------------------------------------------------

LONG = "meta-llama/Llama-3.1-8B-Instruct"


def test_text_tables_show_the_axes_that_differ_in_full() -> None:
    runs = [
        {"name": f"model={LONG},beta={b:g},T=1,steps=10", "generator_model": LONG, "beta": b,
         "temperature": 1.0, "steps": 10}
        for b in (0.5, 1.0)
    ]  # fmt: skip
    headers, cells = run_columns(runs)
    assert headers == ["beta"] and cells == [["0.5"], ["1"]]
    two_models = [runs[0], {**runs[0], "generator_model": "m2", "name": "x"}]
    assert run_columns(two_models) == (["model"], [[LONG], ["m2"]])
    assert run_columns(runs[:1]) == (["run"], [[runs[0]["name"]]])  # one run: its full name
    lines = text_table(["run", "n"], [[runs[0]["name"], "1"], ["short", "22"]], right=1)
    assert runs[0]["name"] in lines[1] and lines[2].endswith("22")


@pytest.fixture
def stopped_sweep(tmp_path: Path) -> Iterator[str]:
    """A stop_when sweep of two runs (beta 0.5 and 1) run to the end on SQLite: its URL."""
    url = f"sqlite:///{tmp_path / 'stop.sqlite'}"
    ensure_schema(url)
    sessions = make_sessionmaker(make_engine(url))
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        cfg = sweep_config("stopped", g.url, r.url, prompts=4, beta=[0.5, 1.0], steps=30,
                           chains=3, stop_when={"rhat": 1.2, "ess": 10, "min_steps": 8,
                                                "every": 4})  # fmt: skip
        sweep_id, _ = create_sweep(sessions, parse_config(cfg))
        service = StepService(sessions, concurrency=8)

        async def go() -> None:
            try:
                await run_locally(service, sweep_id, progress=False)
            finally:
                await service.close()

        asyncio.run(go())
    yield url


def test_status_names_retired_prompts_and_both_rewards_apart(stopped_sweep: str) -> None:
    sessions = make_sessionmaker(make_engine(stopped_sweep))
    with sessions() as s:
        statuses = [st for (st,) in s.execute(select(Chain.status)).all()]
    assert "converged" in statuses and set(statuses) <= {"converged", "done"}
    out = CliRunner().invoke(main, ["sweep", "status", "stopped", "--database", stopped_sweep])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:3] == ["beta", "chains", "converged"]
    assert "state reward" in lines[0] and "reward of current states" in out.output
    assert not any(line.startswith("model=") for line in lines)  # the axes, not cut names
    as_json = CliRunner().invoke(
        main, ["sweep", "status", "stopped", "--database", stopped_sweep, "--json"]
    )
    rows = json.loads(as_json.output)
    assert all("mean_state_reward" in r and "mean_reward" not in r for r in rows)
    retired = sum(r["chains_converged"] for r in rows)
    assert retired == statuses.count("converged") > 0
    for r in rows:
        # a retired chain's steps are all done: the run is complete
        assert r["steps_done"] == r["steps_total"] and r["eta_s"] == 0.0
        assert all(p["step"] in (8, 12, 16, 20, 24, 28) for p in r["converged_prompts"])


def test_a_checkpoint_waits_for_siblings_and_a_failed_sibling_releases_it(tmp_path: Path) -> None:
    """Chains at a checkpoint wait for a sibling still before it; when that sibling fails for
    good, they are handed on and go on without a verdict (none is possible without it)."""
    from sqlalchemy import update

    from qalign.steps.outcome import Result
    from qalign.storage import repo

    url = f"sqlite:///{tmp_path / 'gate.sqlite'}"
    ensure_schema(url)
    sessions = make_sessionmaker(make_engine(url))
    cfg = sweep_config("gate", "http://127.0.0.1:9", "http://127.0.0.1:9", prompts=1, beta=1.0,
                       steps=20, chains=3, stop_when=RULE.to_config())  # fmt: skip
    create_sweep(sessions, parse_config(cfg), check=False)
    with sessions.begin() as s:
        ids = list(s.execute(select(Chain.id).order_by(Chain.chain_index)).scalars())
        for cid, step in zip(ids, (8, 8, 5), strict=True):
            s.execute(update(Chain).where(Chain.id == cid).values(current_step=step,
                                                                   status="running"))  # fmt: skip
    service = StepService(sessions)
    first = repo.read_chain(sessions, ids[0])
    gate, wake = service._checkpoint(first, 8, RULE)
    assert gate is not None and gate.result is Result.WAITING and wake == ()
    with sessions.begin() as s:
        s.execute(update(Chain).where(Chain.id == ids[2]).values(status="failed"))
    released = service._released_by_failure(repo.read_chain(sessions, ids[2]), RULE)
    assert released == ((ids[0], 9), (ids[1], 9))
    assert service._checkpoint(first, 8, RULE) == (None, ())  # no verdict: go on
