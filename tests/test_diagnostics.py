"""Convergence diagnostics (`qalign.core.diagnostics`, `qalign.analysis.convergence`) against
ArviZ's `rhat(method="rank")`, `ess(method="bulk")` and `ess(method="tail")` to 1e-6: on random
draws, draws with ties, a stuck chain, the edge cases, and the stored chains of a toy sweep;
and their place in `qalign sweep status` and `qalign report`.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from qalign.analysis.convergence import (
    RHAT_THRESHOLD,
    Pooled,
    run_diagnostics,
    state_traces,
)
from qalign.cli_analysis import eval_command, report_command
from qalign.cli_sweep import sweep_status
from qalign.core import diagnostics as D
from qalign.storage import make_engine, make_sessionmaker
from qalign.storage.models import Chain, Proposal, Run
from qalign.storage.replay import replay
from tests.sweeps_support import cli, sweep_config, write_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ announces its 1.0 refactor on import
    import arviz as az

TOL = 1e-6
PROMPTS, CHAINS, STEPS = 2, 4, 10
TASK = "tests.test_analysis_cli:FirstWordYes"


def arviz_values(x: np.ndarray) -> tuple[float, float, float]:
    """ArviZ's rank R-hat, bulk ESS and tail ESS of a (chains, draws) array."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return (
            float(az.rhat(x, method="rank")),
            float(az.ess(x, method="bulk")),
            float(az.ess(x, method="tail")),
        )


def assert_matches_arviz(x: np.ndarray) -> D.Diagnostics:
    """Ours equal ArviZ's to 1e-6 (NaN where ArviZ's is NaN, inf where it is inf)."""
    ours = D.diagnose(x)
    single = (D.rhat(x), D.ess_bulk(x), D.ess_tail(x))
    for name, mine, one, theirs in zip(
        ("rhat", "ess_bulk", "ess_tail"),
        (ours.rhat, ours.ess_bulk, ours.ess_tail),
        single,
        arviz_values(x),
        strict=True,
    ):
        assert mine == one or (math.isnan(mine) and math.isnan(one)), name  # diagnose = parts
        if math.isnan(theirs) or math.isinf(theirs):
            assert mine == theirs or (math.isnan(mine) and math.isnan(theirs)), (name, x)
        else:
            assert abs(mine - theirs) <= TOL * max(1.0, abs(theirs)), (name, mine, theirs, x)
    return ours


@pytest.fixture(autouse=True)
def _quiet_arviz(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="arviz")  # its shape warnings for the edge cases


# ---- pure: random draws, ties, stuck chains, edge cases -----------------------------------


@pytest.mark.parametrize(
    ("chains", "draws"),
    [(2, 4), (2, 5), (4, 10), (4, 11), (3, 57), (8, 200), (1, 30), (16, 101)],
)
def test_random_draws_match_arviz(chains: int, draws: int) -> None:
    rng = np.random.default_rng(chains * 1000 + draws)
    assert_matches_arviz(rng.normal(size=(chains, draws)))
    # Autocorrelated (random walks, so R-hat is far from 1) and heavy-tailed draws.
    assert_matches_arviz(np.cumsum(rng.normal(size=(chains, draws)), axis=1))
    assert_matches_arviz(rng.standard_cauchy(size=(chains, draws)))


@pytest.mark.parametrize("seed", range(6))
def test_draws_with_ties_match_arviz(seed: int) -> None:
    # Toy rewards repeat a lot: a few values, held over rejected steps; lengths are integers.
    rng = np.random.default_rng(seed)
    chains, draws = 4, int(rng.integers(8, 40))
    values = np.round(rng.normal(size=6), 1)
    x = values[rng.integers(0, 6, size=(chains, draws))]
    hold = rng.random((chains, draws)) < 0.6  # rejected: the state stays
    for k in range(1, draws):
        x[:, k] = np.where(hold[:, k], x[:, k - 1], x[:, k])
    assert_matches_arviz(x)
    assert_matches_arviz(rng.integers(1, 4, size=(chains, draws)).astype(float))  # lengths
    assert_matches_arviz(np.round(x * 0.1, 2))  # ties at values that do not add up exactly


@pytest.mark.parametrize("seed", range(4))
def test_a_stuck_chain_matches_arviz_and_raises_rhat(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=(4, 20))
    moving = assert_matches_arviz(x)
    x[int(rng.integers(0, 4))] = x[0, 0] if seed % 2 else 3.0  # stuck inside or outside the bulk
    stuck = assert_matches_arviz(x)
    assert stuck.rhat > RHAT_THRESHOLD
    if seed % 2 == 0:
        assert stuck.rhat > moving.rhat


def test_edge_cases_match_arviz() -> None:
    rng = np.random.default_rng(7)
    # Every draw equal: R-hat 0/0 = NaN; ESS counts every (split) draw.
    d = assert_matches_arviz(np.full((4, 10), 0.7))
    assert math.isnan(d.rhat) and d.ess_bulk == d.ess_tail == 40
    d = assert_matches_arviz(np.full((3, 9), 2.0))  # odd: the middle draws are dropped
    assert d.ess_bulk == 24
    # Each chain constant at its own value: all the variance is between chains.
    d = assert_matches_arviz(np.repeat(np.arange(4.0)[:, None], 10, axis=1))
    assert d.rhat == math.inf
    # ±1 around a median of 0: every folded draw equal, the tail R-hat is NaN, the bulk stands.
    d = assert_matches_arviz(np.tile([1.0, -1.0], (4, 5)))
    assert math.isfinite(d.rhat)
    # Too few draws, one chain, a NaN draw.
    for short in (rng.normal(size=(4, 3)), rng.normal(size=(2, 1))):
        d = assert_matches_arviz(short)
        assert math.isnan(d.rhat) and math.isnan(d.ess_bulk) and math.isnan(d.ess_tail)
    d = assert_matches_arviz(rng.normal(size=(1, 12)))
    assert math.isnan(d.rhat) and d.ess_bulk > 0
    with_nan = rng.normal(size=(4, 10))
    with_nan[2, 3] = math.nan
    d = assert_matches_arviz(with_nan)
    assert math.isnan(d.rhat) and math.isnan(d.ess_bulk) and math.isnan(d.ess_tail)
    # Infinite and huge rewards (stored ones can be): silent, and still ArviZ's values.
    inf = math.inf
    assert_matches_arviz(np.array([[inf, -inf, 1, 2, 3], [1, 2, 3, 4, 5]]))
    assert_matches_arviz(np.array([[1e308, -1e308, 1e308, 2, 3], [1e308, 2, 3, 4, -1e308]]))
    assert assert_matches_arviz(np.array([[-inf] * 6, [1.0] * 6])).rhat == inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.diagnose(np.array([[1e308, -1e308, 1e308, 2, 3], [inf, 2, 3, 4, -inf]]))
    assert D.diagnose(rng.normal(size=12)).chains == 1  # a 1-d array is one chain
    with pytest.raises(ValueError, match="shape"):
        D.diagnose(np.zeros((2, 2, 2)))


def test_normal_quantile_is_as241() -> None:
    p = np.concatenate([np.linspace(1e-12, 1 - 1e-12, 2001), [1e-300, 0.075, 0.925, 1 - 2**-53]])
    expected = [statistics.NormalDist().inv_cdf(float(v)) for v in p]
    assert D.normal_quantile(p).tolist() == expected


def test_rank_normalise_averages_ties() -> None:
    z = D.rank_normalise([[1.0, 2.0, 2.0, 3.0]])
    assert z[0, 1] == z[0, 2] and z[0, 0] == -z[0, 3] < 0
    assert z[0, 1] == pytest.approx(statistics.NormalDist().inv_cdf((2.5 - 3 / 8) / 4.25))


def test_pooled_ignores_undefined_prompts() -> None:
    nan = math.nan
    pooled = Pooled.of(
        [
            D.Diagnostics(1.2, 30.0, 20.0, 4, 11),
            D.Diagnostics(nan, 44.0, 44.0, 4, 11),  # every state equal
            D.Diagnostics(1.0, 50.0, 10.0, 4, 11),
        ]
    )
    assert pooled.prompts == 3 and pooled.undefined == 1 and pooled.rhat_over == 1
    assert pooled.rhat_max == 1.2 and pooled.rhat_median == pytest.approx(1.1)
    assert (pooled.ess_bulk_min, pooled.ess_bulk_median) == (30.0, 44.0)
    assert (pooled.ess_tail_min, pooled.ess_min) == (10.0, 10.0)
    inf = Pooled.of([D.Diagnostics(math.inf, 10.0, 10.0, 4, 11)])
    assert inf.rhat_infinite == 1 and inf.to_json()["rhat_max"] is None
    empty = Pooled.of([])
    assert empty.prompts == 0 and math.isnan(empty.rhat_max) and math.isnan(empty.ess_min)


# ---- stored chains of a toy sweep --------------------------------------------------------


@pytest.fixture(scope="module")
def swept(
    tmp_path_factory: pytest.TempPathFactory, toy: tuple[str, str]
) -> Iterator[tuple[str, Path]]:
    """A qalign sweep (2 prompts × 4 chains × 10 steps, two β) run once with `qalign run`."""
    tmp = tmp_path_factory.mktemp("diag")
    url = f"sqlite:///{tmp / 'qalign.sqlite'}"
    cfg = sweep_config("diag", *toy, prompts=PROMPTS, chains=CHAINS, steps=STEPS, beta=[0.5, 4])
    out = cli("run", str(write_config(tmp, cfg)), "--database", url, "--quiet")
    assert out.returncode == 0, out.stderr
    assert "rhat r/l" in out.stdout  # the status printed at the end of the run
    yield url, tmp


def _same(a: D.Diagnostics, b: D.Diagnostics) -> bool:
    """Equal, NaN included."""
    return np.array_equal(
        [a.rhat, a.ess_bulk, a.ess_tail], [b.rhat, b.ess_bulk, b.ess_tail], equal_nan=True
    ) and (a.chains, a.draws) == (b.chains, b.draws)


def _sessions(url: str):
    return make_sessionmaker(make_engine(url))


def _run_ids(url: str) -> list[int]:
    with _sessions(url)() as s:
        return list(s.execute(select(Run.id).order_by(Run.id)).scalars())


def _expected_traces(
    url: str, run_id: int, *, final: bool = True
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per prompt: the states' rewards and lengths, rebuilt from the proposals by the replay
    (`final`: the last ones are the chains' stored state)."""
    with _sessions(url)() as s:
        chains = s.execute(
            select(Chain.id, Chain.prompt_id, Chain.state_reward, Chain.state_tokens)
            .where(Chain.run_id == run_id)
            .order_by(Chain.prompt_id, Chain.chain_index)
        ).all()
        rows = s.execute(
            select(
                Proposal.chain_id,
                Proposal.step,
                Proposal.cut,
                Proposal.new_tokens,
                Proposal.accepted,
                Proposal.reward,
            ).where(Proposal.run_id == run_id)
        ).all()
    by_chain: dict[int, list] = {}
    for cid, step, cut, new, accepted, reward in rows:
        by_chain.setdefault(cid, []).append((step, cut, new, accepted, reward))
    out: dict[int, tuple[list, list]] = {}
    for cid, prompt_id, final_reward, final_tokens in chains:
        props = sorted(by_chain[cid])
        walked = replay([(st, cut, new, acc) for st, cut, new, acc, _ in props])
        rewards, reward = [], math.nan
        for (_, _, _, _, r), w in zip(props, walked, strict=True):
            if w.accepted or w.step == 0:
                reward = math.nan if r is None else r
            rewards.append(reward)
        if final:
            assert rewards[-1] == final_reward and len(walked[-1].state) == len(final_tokens)
        rw, ln = out.setdefault(prompt_id, ([], []))
        rw.append(rewards)
        ln.append([len(w.state) for w in walked])
    return {k: (np.array(rw), np.array(ln, dtype=float)) for k, (rw, ln) in out.items()}


def _check_run(url: str, run_id: int, *, final: bool = True) -> list:
    """The run's diagnostics equal ArviZ's on its state traces, prompt by prompt and pooled."""
    sessions = _sessions(url)
    expected = _expected_traces(url, run_id, final=final)
    traces = list(state_traces(sessions, run_id))
    assert [p for p, _, _ in traces] == list(range(PROMPTS))
    for (_, rewards, lengths), (rw, ln) in zip(traces, expected.values(), strict=True):
        assert np.array_equal(np.array(rewards), rw) and np.array_equal(np.array(lengths), ln)
    diags = run_diagnostics(sessions, run_id)
    assert [p.prompt_index for p in diags.prompts] == list(range(PROMPTS))
    for p, (rw, ln) in zip(diags.prompts, expected.values(), strict=True):
        assert (p.chains, p.draws) == (CHAINS, STEPS + 1) == rw.shape
        for ours, x in ((p.reward, rw), (p.length, ln)):
            assert _same(ours, assert_matches_arviz(x))
    for q in ("reward", "length"):
        pooled = diags.pooled(q)
        rhats = [getattr(p, q).rhat for p in diags.prompts]
        assert pooled.rhat_max == max(r for r in rhats if not math.isnan(r))
        assert pooled.ess_bulk_min == min(getattr(p, q).ess_bulk for p in diags.prompts)
        assert pooled.ess_tail_min == min(getattr(p, q).ess_tail for p in diags.prompts)
    burnt = run_diagnostics(sessions, run_id, burn_in=3)
    for p, (rw, _) in zip(burnt.prompts, expected.values(), strict=True):
        assert p.draws == STEPS + 1 - 3
        assert _same(p.reward, assert_matches_arviz(rw[:, 3:]))
    return traces


def test_stored_chains_match_arviz(swept: tuple[str, Path]) -> None:
    url, _ = swept
    for run_id in _run_ids(url):
        _check_run(url, run_id)


def test_stored_chains_with_a_stuck_chain_match_arviz(swept: tuple[str, Path]) -> None:
    # A copy of the sweep where one chain of every prompt of the first run never moved: every
    # proposal after its step 0 rejected, as a chain stuck on a high-reward state would be.
    url, tmp = swept
    copy = tmp / "stuck.sqlite"
    shutil.copy(url.removeprefix("sqlite:///"), copy)
    stuck_url = f"sqlite:///{copy}"
    run_id = _run_ids(stuck_url)[0]
    with _sessions(stuck_url).begin() as s:
        stuck = s.execute(
            select(Chain.id).where(Chain.run_id == run_id, Chain.chain_index == 1)
        ).scalars()
        s.execute(
            update(Proposal)
            .where(Proposal.chain_id.in_(list(stuck)), Proposal.step > 0)
            .values(accepted=False)
        )
    traces = _check_run(stuck_url, run_id, final=False)  # the chains' state columns: as run
    for _, rewards, lengths in traces:
        assert len(set(rewards[1])) == len(set(lengths[1])) == 1  # the stuck chain
        assert any(len(set(r)) > 1 for r in rewards)  # among moving ones


def test_status_shows_the_diagnostics(swept: tuple[str, Path]) -> None:
    url, _ = swept
    db = ["--database", url]
    sessions = _sessions(url)
    diags = [run_diagnostics(sessions, run_id) for run_id in _run_ids(url)]
    out = CliRunner().invoke(sweep_status, ["diag", *db], catch_exceptions=False)
    lines = out.output.splitlines()
    assert "rhat r/l" in lines[0] and "ess r/l" in lines[0]
    for line, d in zip(lines[1:3], diags, strict=True):
        rhat = f"{d.reward.rhat_max:.2f}/{d.length.rhat_max:.2f}"
        ess = f"{d.reward.ess_min:.0f}/{d.length.ess_min:.0f}"
        assert line.split()[-2:] == [rhat, ess], line
    assert "rank-normalised split-R-hat" in out.output

    rows = json.loads(
        CliRunner().invoke(sweep_status, ["diag", "--json", *db], catch_exceptions=False).output
    )
    for row, d in zip(rows, diags, strict=True):
        for q in ("reward", "length"):
            got, pooled = row["diagnostics"][q], d.pooled(q)
            assert got["rhat_max"] == pytest.approx(pooled.rhat_max, abs=1e-12)
            assert got["ess_bulk_min"] == pytest.approx(pooled.ess_bulk_min, abs=1e-9)
            assert got["ess_tail_median"] == pytest.approx(pooled.ess_tail_median, abs=1e-9)
            assert got["ess_min"] == pytest.approx(pooled.ess_min, abs=1e-9)
            assert got["prompts"] == PROMPTS and got["rhat_over"] == pooled.rhat_over
        assert row["diagnostics"]["rhat_threshold"] == RHAT_THRESHOLD

    out = CliRunner().invoke(sweep_status, ["diag", "--no-diagnostics", *db])
    assert out.exit_code == 0 and "rhat" not in out.output
    rows = json.loads(
        CliRunner().invoke(sweep_status, ["diag", "--json", "--no-diagnostics", *db]).output
    )
    assert [r["diagnostics"] for r in rows] == [None, None]


def test_status_has_no_diagnostics_for_ancestral_runs(tmp_path: Path, toy) -> None:
    url = f"sqlite:///{tmp_path / 'anc.sqlite'}"
    anc = sweep_config("anc-diag", *toy, prompts=2, chains=3, method="ancestral")
    del anc["steps"], anc["beta"]
    out = cli("run", str(write_config(tmp_path, anc)), "--database", url, "--quiet")
    assert out.returncode == 0, out.stderr
    rows = json.loads(
        CliRunner().invoke(sweep_status, ["anc-diag", "--json", "--database", url]).output
    )
    assert [r["diagnostics"] for r in rows] == [None]
    out = CliRunner().invoke(sweep_status, ["anc-diag", "--database", url])
    assert out.output.splitlines()[1].split()[-2:] == ["-", "-"]
    assert "rank-normalised" not in out.output  # no legend without a diagnosed run


def test_report_shows_the_diagnostics(swept: tuple[str, Path]) -> None:
    url, tmp = swept
    db = ["--database", url]
    out = CliRunner().invoke(eval_command, ["diag", "--task", TASK, "--quiet", *db])
    assert out.exit_code == 0, out.output
    report = tmp / "report"
    out = CliRunner().invoke(
        report_command,
        ["diag", "-o", str(report), "--bootstrap", "20", "--burn-in", "2", *db],
        catch_exceptions=False,
    )
    assert out.exit_code == 0, out.output
    md = (report / "report.md").read_text()
    assert "### Convergence diagnostics" in md and "less the first 2 of each chain" in md
    sessions = _sessions(url)
    summary = json.loads((report / "report.json").read_text())["diagnostics"]
    with sessions() as s:
        runs = s.execute(select(Run.id, Run.name).order_by(Run.id)).all()
    assert sorted(summary) == sorted(f"diag/{name}" for _, name in runs)
    for run_id, name in runs:
        d = run_diagnostics(sessions, run_id, burn_in=2)
        for q in ("reward", "length"):
            p = d.pooled(q)
            row = (
                f"| diag/{name} | {q} | {PROMPTS} | {p.rhat_max:.3f} | {p.rhat_median:.3f} | "
                f"{p.rhat_over} | {p.ess_bulk_min:.0f} ({p.ess_bulk_median:.0f}) | "
                f"{p.ess_tail_min:.0f} ({p.ess_tail_median:.0f}) |"
            )
            assert row in md, row
        got = summary[f"diag/{name}"]
        assert got["burn_in"] == 2 and len(got["prompts"]) == PROMPTS
        expected = _expected_traces(url, run_id).values()
        for prompt, (rewards, _) in zip(got["prompts"], expected, strict=True):
            theirs = arviz_values(rewards[:, 2:])
            assert prompt["draws"] == STEPS + 1 - 2
            assert prompt["reward"]["rhat"] == pytest.approx(theirs[0], abs=TOL)
            assert prompt["reward"]["ess_bulk"] == pytest.approx(theirs[1], abs=TOL)
            assert prompt["reward"]["ess_tail"] == pytest.approx(theirs[2], abs=TOL)
