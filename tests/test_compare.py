"""One comparison: qalign, quest, power, smc and ancestral sweeps through eval, predict, report.

Five toy sweeps (a sweep has one method) run into one database with `qalign run`; `qalign
report` over all of them must put every method on the task's one comparison figure and table,
`qalign predict` must answer for power and SMC, and the SMC values must follow from the stored
rows (weights, final particles, every block's cost).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from qalign.analysis import predict as P
from qalign.analysis.report import cost_axes
from qalign.cli import main
from qalign.storage import make_engine, make_sessionmaker
from qalign.storage.models import Answer, Chain, Prompt, Proposal, Run, SmcAncestry
from tests.sweeps_support import cli, sweep_config, write_config

TASK = "tests.test_analysis_cli:FirstWordYes"
PROMPTS, CHAINS, STEPS = 4, 3, 4
SWEEPS = ("cmp-qa", "cmp-quest", "cmp-power", "cmp-smc", "cmp-anc")


def _configs(toy: tuple[str, str]) -> list[dict[str, Any]]:
    common: dict[str, Any] = {"prompts": PROMPTS, "chains": CHAINS, "steps": STEPS, "beta": 1.0}
    qa = sweep_config("cmp-qa", *toy, **common)
    quest = sweep_config("cmp-quest", *toy, method="quest", **common)
    power = sweep_config("cmp-power", *toy, method="power", alpha=2.0, **common)
    del power["reward"], power["beta"]
    smc = sweep_config("cmp-smc", *toy, method="smc", smc={"block_tokens": 1}, **common)
    del smc["steps"]
    anc = sweep_config("cmp-anc", *toy, method="ancestral", **{**common, "chains": 6})
    del anc["steps"], anc["beta"]
    return [qa, quest, power, smc, anc]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, toy: tuple[str, str]) -> str:
    """The five sweeps run and checked with the test task; the database URL (the tests only
    read it, so the module shares one)."""
    tmp_path = tmp_path_factory.mktemp("compare")
    sqlite_url = f"sqlite:///{tmp_path / 'qalign.sqlite'}"
    for cfg in _configs(toy):
        out = cli("run", str(write_config(tmp_path, cfg)), "--database", sqlite_url, "--quiet")
        assert out.returncode == 0, out.stderr
    out = _cli("eval", *SWEEPS, "--task", TASK, "--quiet", "--database", sqlite_url)
    assert out.exit_code == 0, out.output
    return sqlite_url


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _predict(url: str, sweep: str, method: str) -> list[dict[str, Any]]:
    out = _cli("predict", sweep, "--method", method, "--json", "--database", url)
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def _expected_smc(url: str) -> dict[str, tuple[float, float, float, float]]:
    """From the stored rows: per SMC method (accuracy, gen tokens, RM tokens, seconds) per
    prompt, with the weighted vote done by hand over normalised exp(log_weight)."""
    sessions = make_sessionmaker(make_engine(url))
    with sessions() as s:
        run = s.execute(select(Run).where(Run.method == "smc")).scalar_one()
        rows = s.execute(
            select(Prompt.prompt_index, Proposal.step, Proposal.log_weight, Proposal.gen_tokens,
                   Proposal.reward_tokens, Proposal.generator_seconds, Proposal.reward_seconds,
                   Answer.answer, Answer.correct)
            .join(Chain, Chain.id == Proposal.chain_id)
            .join(Prompt, Prompt.id == Chain.prompt_id)
            .join(Answer, Answer.proposal_id == Proposal.id)
            .where(Proposal.run_id == run.id)
        ).all()  # fmt: skip
        final = run.steps
    cost: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    finals: dict[int, list[tuple[float, str | None, bool]]] = defaultdict(list)
    for k, step, lw, gen, rm, gs, rs, answer, correct in rows:
        cost[k][0] += gen
        cost[k][1] += rm or 0
        cost[k][2] += gs + rs
        if step == final:
            finals[k].append((-math.inf if lw is None else lw, answer, correct))
    weighted, plain = [], []
    for k, parts in finals.items():
        assert len(parts) == CHAINS
        top = max(w for w, _, _ in parts)
        total = sum(math.exp(w - top) for w, _, _ in parts)
        mass: dict[str | None, float] = defaultdict(float)
        votes: dict[str | None, int] = defaultdict(int)
        verdict = {a: c for _, a, c in reversed(parts)}
        for w, a, _ in parts:
            mass[a] += math.exp(w - top) / total
            votes[a] += 1
        assert math.isclose(sum(mass.values()), 1.0)
        mass.pop(None, None)
        votes.pop(None, None)
        # Ties would make the expected answer ambiguous: the toy data must not have them here.
        for counts, out in ((mass, weighted), (votes, plain)):
            ranked = sorted(counts.values(), reverse=True)
            assert len(ranked) < 2 or ranked[0] != ranked[1], (k, counts)
            out.append(float(verdict[max(counts, key=counts.__getitem__)]) if counts else 0.0)
    n = len(finals)
    mean = [sum(cost[k][i] for k in finals) / n for i in range(3)]
    return {
        "smc": (sum(weighted) / n, *mean),  # type: ignore[dict-item]
        "smc-mv": (sum(plain) / n, *mean),  # type: ignore[dict-item]
    }


def test_predict_votes_power_chains_and_smc_particles(compared: str) -> None:
    url = compared
    power = _predict(url, "cmp-power", "power")
    assert [c["run_method"] for c in power] == ["power"] and power[0]["alpha"] == 2.0
    budgets = [p["budget"] for p in power[0]["points"]]
    assert budgets == P.default_budgets(CHAINS * (STEPS + 1))
    assert all(p["reward_tokens"] == 0 for p in power[0]["points"])
    # The chain vote without rewards: QAlign's own method names the runs it needs.
    out = CliRunner().invoke(main, ["predict", "cmp-power", "--method", "qalign",
                                    "--database", url])  # fmt: skip
    assert out.exit_code != 0 and "`method: qalign`" in out.output

    expected = _expected_smc(url)
    for method in ("smc", "smc-mv"):
        (curve,) = _predict(url, "cmp-smc", method)
        (point,) = curve["points"]  # one point per run: its particles
        assert point["budget"] == CHAINS and point["prompts"] == PROMPTS
        acc, gen, rm, secs = expected[method]
        assert point["accuracy"] == pytest.approx(acc)
        assert point["gen_tokens"] == pytest.approx(gen) and gen > 0
        assert point["reward_tokens"] == pytest.approx(rm)
        assert point["server_seconds"] == pytest.approx(secs)
    for method, needs in (("smc", "smc"), ("power", "power")):
        out = CliRunner().invoke(main, ["predict", "cmp-qa", "--method", method,
                                        "--database", url])  # fmt: skip
        assert out.exit_code != 0 and f"`method: {needs}`" in out.output, out.output


def test_report_puts_every_method_on_one_figure_and_table(compared: str, tmp_path: Path) -> None:
    url = compared
    out_dir = tmp_path / "report"
    out = _cli("report", *SWEEPS, "-o", str(out_dir), "--generator-params", "1e6",
               "--reward-params", "1e6", "--bootstrap", "50", "--database", url)  # fmt: skip
    assert out.exit_code == 0, out.output
    md = (out_dir / "report.md").read_text()
    summary = json.loads((out_dir / "report.json").read_text())
    methods = {(c["run_method"], c["method"]) for c in summary["curves"]}
    assert methods == {
        ("qalign", "qalign"),
        ("quest", "qalign"),
        ("power", "power"),
        ("smc", "smc"),
        ("smc", "smc-mv"),
        ("ancestral", "mv"),
        ("ancestral", "wmv"),
        ("ancestral", "bon"),
    }
    assert "compare-first-word-yes.png" in summary["images"]
    assert (out_dir / "compare-first-word-yes.png").stat().st_size > 0
    # The comparison table: one section for the task, every method's rows in it, with the three
    # cost columns (FLOPs: parameter counts given; seconds: every proposal has them stored).
    start = md.index("### Comparison: every method (first-word-yes)")
    table = md[start : md.index("![comparison", start)]
    assert md.count("### Comparison") == 1
    for name in ("QAlign", "QUEST", "Power", "SMC (weighted vote)", "SMC (majority vote)", "| MV",
                 "WMV", "BoN"):  # fmt: skip
        assert name in table, name
    assert "FLOPs/prompt" in table and "server s/prompt" in table
    assert "| SMC (weighted vote) | cmp-smc/" in table
    assert f"({CHAINS} particles) | {CHAINS} |" in table
    # Every curve's points are rows of the table.
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) - 1 == sum(len(c["points"]) for c in summary["curves"])


def test_cost_axes_follow_what_every_point_has() -> None:
    from qalign.analysis.data import RunInfo
    from qalign.analysis.report import Curve

    run = RunInfo(1, 1, "s", "r", "smc", 1.0, 1.0, 1, "g", "rm", 2)
    point = P.Point(2, 0.5, 0.4, 0.6, 3, 10.0, 5.0, flops=None, server_seconds=0.2)
    untimed = P.Point(2, 0.5, 0.4, 0.6, 3, 10.0, 5.0, flops=3e7, server_seconds=None)
    assert cost_axes([Curve(run, "t", "smc", [point])]) == ["tokens", "seconds"]
    assert cost_axes([Curve(run, "t", "smc", [point, untimed])]) == ["tokens"]


def test_weighted_particle_vote_uses_normalised_weights() -> None:
    def s(answer: str | None, correct: bool) -> P.Sample:
        return P.Sample(answer, correct)

    # Two particles say "b" but the one "a" carries most of the weight.
    ps = P.ParticleSet(
        particles=(s("a", True), s("b", False), s("b", False), s(None, False)),
        log_weights=(math.log(0.6), math.log(0.15), math.log(0.15), math.log(0.1)),
        gen_tokens=8,
        reward_tokens=4,
    )
    assert P.smc_answer(ps) == "a" and P.smc_correct(ps)
    assert P.smc_answer(ps, weighted=False) == "b" and not P.smc_correct(ps, weighted=False)
    # Zero-weight particles abstain; a prompt whose particles all died has no answer.
    dead = P.ParticleSet((s("a", True), s("b", False)), (-math.inf, 0.0), 2, 2)
    assert P.smc_answer(dead) == "b"
    none = P.ParticleSet((s("a", True),), (-math.inf,), 1, 1)
    assert P.smc_answer(none) is None and not P.smc_correct(none)
    (point,) = P.smc_curve({0: ps, 1: none}, 4, resamples=0, params={"generator": 1.0})
    assert (point.budget, point.accuracy) == (4, 0.5)
    assert (point.gen_tokens, point.reward_tokens) == (4.5, 2.5)
    assert point.flops is None  # reward tokens without a reward-model parameter count
    with pytest.raises(ValueError, match="unknown SMC method"):
        P.smc_curve({0: ps}, 4, method="qalign")


def test_export_has_log_weights_and_the_smc_genealogy(compared: str, tmp_path: Path) -> None:
    url = compared
    out = _cli("export", "cmp-smc", "-o", str(tmp_path / "x"), "--format", "jsonl",
               "--database", url)  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "SMC resamplings" in out.output

    def read(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (tmp_path / "x" / f"{name}.jsonl").open()]

    proposals, ancestry, resamples = read("proposals"), read("smc_ancestry"), read("smc_resamples")
    sessions = make_sessionmaker(make_engine(url))
    with sessions() as s:
        stored = {(p.chain_id, p.step): p.log_weight for p in s.scalars(select(Proposal))}
        lineage = {(a.chain_id, a.block): a.parent_chain_id for a in s.scalars(select(SmcAncestry))}
        run = s.execute(select(Run).where(Run.method == "smc")).scalar_one()
    assert {(p["chain_id"], p["step"]): p["log_weight"] for p in proposals} == {
        k: v for k, v in stored.items() if k[0] in {p["chain_id"] for p in proposals}
    }
    assert any(p["log_weight"] not in (None, 0.0) for p in proposals)
    assert {(a["chain_id"], a["block"]): a["parent_chain_id"] for a in ancestry} == lineage
    # One barrier per prompt between consecutive blocks, one ancestry row per particle each.
    assert len(resamples) == PROMPTS * run.steps
    assert len(ancestry) == PROMPTS * run.steps * CHAINS
    assert {r["prompt_index"] for r in resamples} == set(range(PROMPTS))
    # A sweep without SMC runs exports no SMC files.
    out = _cli("export", "cmp-qa", "-o", str(tmp_path / "q"), "--database", url)
    assert out.exit_code == 0 and not list((tmp_path / "q").glob("smc_*"))
