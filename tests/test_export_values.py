"""Export and status never fail on stored values, on real SQLite and PostgreSQL.

Rows are written straight into the database with the values a sweep can leave behind (the
`-inf` log_a of a proposal rejected outright, ±inf and NaN rewards that slipped through, rewards
near the float64 limit), then read back through the CLI: `qalign export` must write strict JSON
lines and Parquet whose column types come from the SQL schema in every batch, and
`qalign sweep status --json` must print strict JSON with a mean over finite rewards only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, insert, select

from qalign.analysis.data import run_summary
from qalign.cli import main
from qalign.storage import (
    Chain,
    Prompt,
    Proposal,
    Run,
    Sweep,
    make_engine,
    make_sessionmaker,
    upgrade,
)
from qalign.storage import export as export_module

INF = math.inf
NAN = math.nan
HUGE = 1e308
TINY = 5e-324  # the smallest subnormal: scaling it must not underflow on PostgreSQL

# Rewards stored for the chains of run "wild" (state_reward) and its proposals (reward).
WILD_REWARDS = [-INF, INF, NAN, HUGE, HUGE, -HUGE, HUGE, 2.0, None, TINY]
WILD_FINITE = [r for r in WILD_REWARDS if r is not None and math.isfinite(r)]
# Their sum overflows float64; the mean does not.
WILD_MEAN = sum(r / len(WILD_FINITE) for r in WILD_FINITE)
# Run "huge": finite values only, so nothing but their size can break an average (PostgreSQL's
# AVG raises "value out of range: overflow" on them).
HUGE_REWARDS = [HUGE, HUGE, TINY, HUGE, -TINY, HUGE, 1.0, HUGE, HUGE, 0.0]
HUGE_MEAN = sum(r / len(HUGE_REWARDS) for r in HUGE_REWARDS)
# Run "unscored": non-finite rewards only (-inf chain states, NaN proposals): its mean is null.
REWARDS = {"wild": WILD_REWARDS, "huge": HUGE_REWARDS}
STEPS = len(WILD_REWARDS)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def _strict_loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


def _store(engine: Engine) -> None:
    """Sweep "wild": run "wild" (non-finite and huge values), run "tame" (all non-finite)."""
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        sweep = Sweep(name="wild", config={}, config_hash="0" * 64)
        s.add(sweep)
        s.flush()
        prompt = Prompt(sweep_id=sweep.id, prompt_index=0, messages=[], reference="1", row={})
        runs = [
            Run(
                sweep_id=sweep.id,
                grid_index=i,
                name=name,
                method="qalign",
                beta=1.0,
                temperature=1.0,
                steps=len(WILD_REWARDS) - 1,
                generator_model="gen",
                reward_model="rm",
                config={},
            )
            for i, name in enumerate(["wild", "unscored", "huge"])
        ]
        s.add_all([prompt, *runs])
        s.flush()
        chains = []
        for run in runs:
            for i in range(STEPS):
                chains.append(
                    Chain(
                        run_id=run.id,
                        prompt_id=prompt.id,
                        chain_index=i,
                        seed=i,
                        rng_key=f"{run.name}/{i}",
                        target_steps=len(WILD_REWARDS) - 1,
                        current_step=len(WILD_REWARDS) - 1,
                        status="done",
                        state_tokens=[1, 2],
                        state_reward=REWARDS.get(run.name, [-INF] * STEPS)[i],
                    )
                )
        s.add_all(chains)
        s.flush()
        names = {run.id: run.name for run in runs}
        rows: list[dict[str, Any]] = []
        for chain in chains:
            for step in range(STEPS):
                rows.append(
                    {
                        "chain_id": chain.id,
                        "run_id": chain.run_id,
                        "step": step,
                        "cut": 0,
                        "new_tokens": [step],
                        "response_len": 1,
                        "text": "x",
                        "reward": REWARDS.get(names[chain.run_id], [NAN] * STEPS)[step],
                        # Exports go chain by chain: the first chains' rows (the first
                        # batches) hold only nulls in these columns, later ones every kind of value.
                        "log_a": None
                        if step == 0 or chain.chain_index == 0
                        else [-INF, INF, NAN, HUGE, -HUGE][step % 5],
                        "alpha": 0.0 if step == 0 else [0.0, 1.0, 0.5, 1.0, 0.0][step % 5],
                        "accepted": step % 2 == 0,
                        "finish": "stop",
                        "gen_seed": step,
                        "gen_tokens": 1,
                        "reward_tokens": None if chain.chain_index < 2 else step,
                        "gen_latency_ms": HUGE if step == 3 else 1.0,
                        "reward_latency_ms": INF if step == 4 else 1.0,
                        "endpoint": "http://gen",
                    }
                )
        s.execute(insert(Proposal), rows)


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> int:
    """Export in batches of 7 rows, so a few hundred rows make many batches."""
    monkeypatch.setattr(export_module, "BATCH", 7)
    return 7


def _export(db_url: str, out: Path, fmt: str) -> None:
    result = _cli("export", "wild", "-o", str(out), "--format", fmt, "--database", db_url)
    assert result.exit_code == 0, result.output


def test_jsonl_export_is_strict_json_with_null_for_non_finite(
    db_url: str, engine: Engine, tmp_path: Path, small_batches: int
) -> None:
    _store(engine)
    _export(db_url, tmp_path, "jsonl")
    proposals = [_strict_loads(line) for line in (tmp_path / "proposals.jsonl").open()]
    chains = [_strict_loads(line) for line in (tmp_path / "chains.jsonl").open()]
    assert len(proposals) == 3 * STEPS**2 > 10 * small_batches
    assert len(chains) == 3 * STEPS

    def numbers(rows: list[dict[str, Any]], column: str) -> list[float | None]:
        values = [row[column] for row in rows]
        # One JSON type per column: a number or null, never a string such as "inf".
        assert all(v is None or type(v) in (int, float) for v in values), (column, values)
        return values

    for column in ("reward", "log_a", "alpha", "gen_latency_ms", "reward_latency_ms"):
        numbers(proposals, column)
    wild = sorted(
        (p["chain_index"], p["step"], p["reward"], p["log_a"])
        for p in proposals
        if p["run"] == "wild"
    )
    expected_reward = [None if r is None or not math.isfinite(r) else r for r in WILD_REWARDS]
    assert [w[2] for w in wild[: len(WILD_REWARDS)]] == expected_reward
    assert {w[3] for w in wild} == {None, HUGE, -HUGE}
    assert {p["reward"] for p in proposals if p["run"] == "unscored"} == {None}

    by_run = sorted(chains, key=lambda c: (c["run"], c["chain_index"]))
    rewards = numbers(by_run, "state_reward")
    # Runs in name order: "huge", "unscored", "wild".
    assert rewards == HUGE_REWARDS + [None] * STEPS + expected_reward
    assert {p["reward"] for p in proposals if p["run"] == "huge"} == set(HUGE_REWARDS)


def _expected_type(table: str, column: str) -> pa.DataType:
    if column in ("run", "text", "finish", "reject_reason", "endpoint", "worker", "status"):
        return pa.string()
    if column in ("state_finish", "state_text", "last_error", "reference"):
        return pa.string()
    if column in ("new_tokens", "state_tokens"):
        return pa.list_(pa.int64())
    if column == "reward_terms":
        return pa.map_(pa.string(), pa.float64())
    if column in ("reward", "log_a", "alpha", "gen_latency_ms", "reward_latency_ms"):
        return pa.float64()
    if column in ("generator_seconds", "reward_seconds", "queue_seconds", "log_weight"):
        return pa.float64()
    if column == "state_reward":
        return pa.float64()
    if column == "accepted":
        return pa.bool_()
    if column == "created_at":
        return pa.timestamp("us", tz="UTC")
    return pa.int64()


def test_parquet_export_has_one_schema_from_sql_in_every_batch(
    db_url: str, engine: Engine, tmp_path: Path, small_batches: int
) -> None:
    _store(engine)
    _export(db_url, tmp_path, "parquet")
    for table in ("proposals", "chains"):
        parquet = pq.ParquetFile(tmp_path / f"{table}.parquet")
        assert parquet.metadata.num_row_groups > 1
        schema = parquet.schema_arrow
        for field in schema:
            assert field.type == _expected_type(table, field.name), (table, field)
        for i in range(parquet.metadata.num_row_groups):
            group = parquet.read_row_group(i)
            assert group.schema == schema
            for column in ("reward", "log_a", "state_reward", "reward_tokens"):
                if column in schema.names:
                    # All-null in the first groups, values later: the type never changes.
                    assert group.schema.field(column).type == _expected_type(table, column)

    proposals = pq.read_table(tmp_path / "proposals.parquet").to_pylist()
    assert len(proposals) == 3 * STEPS**2
    assert any(p["log_a"] is None for p in proposals)
    # ±inf stays ±inf in float64; NaN becomes null; huge values are exact.
    log_a = {p["log_a"] for p in proposals if p["log_a"] is not None}
    assert log_a == {-INF, INF, HUGE, -HUGE}
    wild = sorted(
        (p["chain_index"], p["step"], p["reward"]) for p in proposals if p["run"] == "wild"
    )
    expected = [None if r is None or math.isnan(r) else r for r in WILD_REWARDS]
    assert [w[2] for w in wild[: len(WILD_REWARDS)]] == expected
    assert {p["reward"] for p in proposals if p["run"] == "unscored"} == {None}
    assert {p["reward_latency_ms"] for p in proposals} == {1.0, INF}
    # Rows stored without the wall-clock columns (as before migration 0007) export them as null.
    assert {p["generator_seconds"] for p in proposals} == {None}
    assert {"reward_seconds", "queue_seconds"} <= set(proposals[0])

    chains = pq.read_table(tmp_path / "chains.parquet").to_pylist()
    wild_chains = sorted(
        (c["chain_index"], c["state_reward"]) for c in chains if c["run"] == "wild"
    )
    assert [c[1] for c in wild_chains] == expected


def test_status_json_is_strict_with_mean_over_finite_rewards(db_url: str, engine: Engine) -> None:
    _store(engine)
    result = _cli("sweep", "status", "wild", "--json", "--database", db_url)
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in _strict_loads(result.output)}
    assert rows["wild"]["mean_state_reward"] == pytest.approx(WILD_MEAN)
    assert rows["huge"]["mean_state_reward"] == pytest.approx(HUGE_MEAN)
    assert rows["unscored"]["mean_state_reward"] is None


def test_run_summary_mean_reward_over_finite_rewards(engine: Engine) -> None:
    _store(engine)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        run_ids = {name: run_id for name, run_id in s.execute(select(Run.name, Run.id))}
    wild = run_summary(sessions, run_ids["wild"])
    # Every chain holds each reward of its run once; 1e308 + 1e308 overflows a plain SUM.
    assert wild.mean_proposal_reward == pytest.approx(WILD_MEAN)
    assert run_summary(sessions, run_ids["huge"]).mean_proposal_reward == pytest.approx(HUGE_MEAN)
    assert run_summary(sessions, run_ids["unscored"]).mean_proposal_reward is None
