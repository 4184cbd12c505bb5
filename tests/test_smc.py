"""Sequential Monte Carlo (`method: smc`): exact target, stored rows, barrier, durability."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from qalign.config import ConfigError, parse_config
from qalign.core.smc import (
    block_count,
    ess,
    increment,
    prompt_key,
    resample,
    resample_uniform,
    systematic,
)
from qalign.dispatch.inprocess import InProcessDispatcher
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep, reap
from qalign.steps.drive import drive, follow
from qalign.steps.outcome import Result
from qalign.steps.service import StepService
from qalign.storage import ensure_schema, make_engine, make_sessionmaker
from qalign.storage.models import Chain, Proposal, SmcAncestry, SmcResample
from qalign.toy.exact import total_variation
from qalign.toy.model import ToyModel
from qalign.toy.server import ToyServerOptions, serve_in_thread
from qalign.toy.smc import pooled, pooled_sd, simulate
from tests.sweeps_support import ROOT, sweep_config

MODEL = ToyModel()
MAX_NEW = 3


# ---- pure pieces --------------------------------------------------------------------------


def test_systematic_resampling_gives_each_particle_floor_or_ceil_of_its_share() -> None:
    weights = [0.5, 0.25, 0.125, 0.125]
    for u in (0.0, 0.3, 0.99):
        parents = systematic(weights, u)
        assert parents == sorted(parents) and len(parents) == 4
        for j, w in enumerate(weights):
            assert math.floor(4 * w) <= parents.count(j) <= math.ceil(4 * w)


def test_resampling_waits_for_a_low_ess_and_keeps_the_mean_weight() -> None:
    even = [0.0, 0.0, 0.0, 0.0]
    assert ess(even) == pytest.approx(4.0)
    kept = resample(even, 0.5, 0.5)
    assert not kept.resampled and kept.parents == (0, 1, 2, 3)
    skewed = [0.0, -10.0, -10.0, -10.0]
    done = resample(skewed, 0.5, 0.5)
    assert done.resampled and done.parents == (0, 0, 0, 0)
    mean = math.log(sum(math.exp(w) for w in skewed) / 4)
    assert done.log_weights == pytest.approx((mean,) * 4)
    dead = resample([-math.inf] * 3, 0.5, 0.5)  # nothing to resample from: lineages kept
    assert not dead.resampled and dead.parents == (0, 1, 2)


def test_the_weight_update_is_a_ratio_of_potentials() -> None:
    assert increment(0.5, 1.5, 1.0) == pytest.approx(1.0)
    assert increment(1.0, math.nan, 0.0) == -math.inf
    assert block_count(3, 1) == 3 and block_count(3, 2) == 2 and block_count(4, 2) == 2


# ---- exactness ------------------------------------------------------------------------------


def _wrong(beta: float, reward: float, previous: float) -> float:
    """The potential itself instead of its ratio to the previous one: no telescoping."""
    return reward / beta if math.isfinite(reward) else -math.inf


def _tv_and_bound(beta: float, block_tokens: int, update: Any, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    extra = {} if update is None else {"update": update}
    runs = [
        simulate(MODEL, beta=beta, max_new_tokens=MAX_NEW, block_tokens=block_tokens,
                 particles=8, ess_threshold=0.5, rng=rng, **extra)
        for _ in range(5000)
    ]  # fmt: skip
    law = pooled(runs)
    sd = pooled_sd(runs, law)
    # Per cell the error is ~ N(0, sd²): E|e| = sd·sqrt(2/pi), and TV = ½Σ|e| has a standard
    # deviation of at most ½Σ sd (triangle inequality); the bound is its mean + 4 of those.
    bound = 0.5 * math.fsum(sd.values()) * (math.sqrt(2 / math.pi) + 4)
    return total_variation(law, MODEL.target(beta, MAX_NEW)), bound


@pytest.mark.parametrize(("beta", "block_tokens"), [(0.5, 1), (1.0, 2)])
def test_weighted_particles_estimate_the_exact_target(beta: float, block_tokens: int) -> None:
    tv, bound = _tv_and_bound(beta, block_tokens, None, seed=20261220)
    assert tv < bound, (tv, bound)


@pytest.mark.parametrize(("beta", "block_tokens"), [(0.5, 1), (1.0, 2)])
def test_a_wrong_weight_update_fails_the_same_test(beta: float, block_tokens: int) -> None:
    tv, bound = _tv_and_bound(beta, block_tokens, _wrong, seed=20261220)
    assert tv > bound, (tv, bound)


# ---- config -----------------------------------------------------------------------------------


def _cfg(**extra: Any) -> dict[str, Any]:
    base = sweep_config("smc", "http://127.0.0.1:9", "http://127.0.0.1:9", prompts=1, beta=1.0)
    base.pop("steps")
    return {**base, "method": "smc", "smc": {"block_tokens": 1}, **extra}


def test_smc_runs_have_one_step_per_block_and_store_their_settings() -> None:
    cfg = parse_config(_cfg(max_new_tokens=5, smc={"block_tokens": 2, "ess_threshold": 0.3}))
    (run,) = cfg.runs()
    assert run.steps == 2 and run.smc is not None and run.smc.ess_threshold == 0.3
    assert run.to_config()["smc"] == {"block_tokens": 2, "ess_threshold": 0.3}
    plain = sweep_config("q", "http://127.0.0.1:9", "http://127.0.0.1:9")
    assert "smc" not in parse_config(plain).runs()[0].to_config()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"smc": None}, "needs an `smc` section"),
        ({"steps": 4}, "take no `steps`"),
        ({"smc": {"block_tokens": 0}}, "block_tokens"),
        ({"smc": {"block_tokens": 1, "ess_threshold": 1.5}}, "ess_threshold"),
        ({"stop_when": {"rhat": 1.1, "ess": 10}}, "stop_when is for"),
        ({"method": "qalign", "steps": 3}, "`smc` section is for `method: smc`"),
    ],
)
def test_smc_settings_are_validated(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_cfg(**extra))


# ---- stored runs ------------------------------------------------------------------------------

SWEEP = {"prompts": 3, "chains": 6, "beta": [0.5], "max_new_tokens": 4}


def _smc_sweep(name: str, gen: str, rm: str, block_tokens: int = 1) -> dict[str, Any]:
    cfg = sweep_config(name, gen, rm, **SWEEP)  # type: ignore[arg-type]
    cfg.pop("steps")
    return {**cfg, "method": "smc", "smc": {"block_tokens": block_tokens, "ess_threshold": 0.7}}


def _open(url: str) -> Any:
    ensure_schema(url)
    return make_sessionmaker(make_engine(url))


async def _run(sessions: Any, sweep_id: int) -> None:
    service = StepService(sessions, concurrency=6)
    try:
        await run_locally(service, sweep_id, progress=False)
    finally:
        await service.close()


def _rows(sessions: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Everything an SMC run stored, keyed by stable coordinates (not database ids)."""
    with sessions() as s:
        keys = dict(s.execute(select(Chain.id, Chain.rng_key)).all())
        proposals = sorted(
            (keys[c], k, tuple(t), r, lw, f)
            for c, k, t, r, lw, f in s.execute(
                select(Proposal.chain_id, Proposal.step, Proposal.new_tokens, Proposal.reward,
                       Proposal.log_weight, Proposal.finish)
            ).all()
        )  # fmt: skip
        ancestry = sorted(
            (keys[a.chain_id], a.block, keys[a.parent_chain_id], a.log_weight,
             tuple(a.state_tokens))
            for a in s.execute(select(SmcAncestry)).scalars()
        )  # fmt: skip
        barriers = sorted(
            (r.block, r.particles, r.ess, r.resampled, r.u)
            for r in s.execute(select(SmcResample)).scalars()
        )
        chains = sorted(
            (k, st, cur, tuple(t or ()))
            for k, st, cur, t in s.execute(
                select(Chain.rng_key, Chain.status, Chain.current_step, Chain.state_tokens)
            ).all()
        )
    return {"proposals": proposals, "ancestry": ancestry, "barriers": barriers, "chains": chains}


@pytest.fixture(scope="module")
def servers() -> Any:
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        yield g.url, r.url


@pytest.fixture(scope="module")
def finished(servers: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    """An uninterrupted SMC sweep on SQLite: (URL, its rows)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('smc') / 'whole.sqlite'}"
    sessions = _open(url)
    sweep_id, _ = create_sweep(sessions, parse_config(_smc_sweep("smc-a", *servers)))
    asyncio.run(_run(sessions, sweep_id))
    return url, _rows(sessions)


def test_stored_particles_follow_the_same_weights_and_resampling_as_the_core(
    finished: tuple[str, Any],
) -> None:
    """Every stored weight is the core's update of the stored rewards, every barrier the core's
    resampling of the stored weights with the (seed, prompt, block) uniform: the HTTP path runs
    the exact algorithm the exactness test checks."""
    url, rows = finished
    sessions = make_sessionmaker(make_engine(url))
    beta, threshold, blocks = 0.5, 0.7, block_count(4, 1)
    with sessions() as s:
        chains = s.execute(select(Chain).order_by(Chain.prompt_id, Chain.chain_index)).scalars()
        by_prompt: dict[int, list[Chain]] = {}
        for c in chains:
            by_prompt.setdefault(c.prompt_id, []).append(c)
        props = {(p.chain_id, p.step): p for p in s.execute(select(Proposal)).scalars()}
        anc = {(a.chain_id, a.block): a for a in s.execute(select(SmcAncestry)).scalars()}
        resampled = 0
        for sibs in by_prompt.values():
            assert {c.status for c in sibs} == {"done"}
            for c in sibs:
                p0 = props[(c.id, 0)]
                assert p0.log_weight == pytest.approx(p0.reward / beta)
            for t in range(1, blocks):
                weights = [props[(c.id, t - 1)].log_weight for c in sibs]
                u = resample_uniform(sibs[0].seed, prompt_key(sibs[0].rng_key), t - 1)
                plan = resample(weights, threshold, u)
                resampled += plan.resampled
                for c, parent, w in zip(sibs, plan.parents, plan.log_weights, strict=True):
                    a = anc[(c.id, t)]
                    assert a.parent_chain_id == sibs[parent].id
                    assert a.log_weight == pytest.approx(w)
                    p = props[(c.id, t)]
                    assert p.cut == len(a.state_tokens)
                    assert p.log_weight == pytest.approx(
                        w + (p.reward - a.state_reward) / beta if p.new_tokens else w
                    )
        assert resampled > 0  # the threshold made the barriers resample, not only pass
    assert len(rows["barriers"]) == 3 * (blocks - 1)


def test_a_duplicate_block_or_barrier_adds_nothing(finished: tuple[str, Any], servers: Any) -> None:
    url, rows = finished
    sessions = make_sessionmaker(make_engine(url))
    service = StepService(sessions)
    with sessions() as s:
        ids = list(s.execute(select(Chain.id)).scalars())

    async def again() -> list[Result]:
        try:
            return [(await service.take(cid, step)).result for cid in ids for step in (1, 2)]
        finally:
            await service.close()

    results = asyncio.run(again())
    assert set(results) <= {Result.DUPLICATE, Result.SKIPPED}
    assert _rows(sessions) == rows


def test_an_interrupted_sweep_resumes_to_the_same_rows(
    finished: tuple[str, Any], servers: Any, tmp_path: Path
) -> None:
    """Stop after an observable state (some particles waiting at a barrier, one barrier run
    with its wake-ups lost), then resume: the rows equal the uninterrupted run's."""
    _, whole = finished
    sessions = _open(f"sqlite:///{tmp_path / 'cut.sqlite'}")
    sweep_id, _ = create_sweep(sessions, parse_config(_smc_sweep("smc-a", *servers)))
    service = StepService(sessions)
    with sessions() as s:
        ids = list(s.execute(select(Chain.id).order_by(Chain.id)).scalars())

    async def part() -> list[Result]:
        try:
            out = [(await service.take(cid, 0)).result for cid in ids[:5]]
            out += [(await service.take(cid, 1)).result for cid in ids[:5]]
            out += [(await service.take(ids[5], step)).result for step in (0, 1)]
            out += [(await service.take(cid, 0)).result for cid in ids[6:8]]
            return out
        finally:
            await service.close()

    results = asyncio.run(part())
    # Five particles of the first prompt wait at the barrier after block 0; the sixth runs it
    # and its block 1, but the wake-ups for its siblings are lost with the "crashed" runner.
    assert results[:5] == [Result.COMMITTED] * 5
    assert results[5:10] == [Result.WAITING] * 5
    assert results[10:] == [Result.COMMITTED] * 4
    with sessions() as s:
        assert len(s.execute(select(SmcResample)).all()) == 1
    asyncio.run(_run(sessions, sweep_id))
    assert _rows(sessions) == whole


def test_the_readme_genealogy_query_traces_every_final_particle(finished: tuple[str, Any]) -> None:
    url, _ = finished
    sessions = make_sessionmaker(make_engine(url))
    query = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[-1]
    assert "smc_ancestry" in query
    with sessions() as s:
        rows = s.execute(text(query)).all()
        anc = {(a.chain_id, a.block): a.parent_chain_id
               for a in s.execute(select(SmcAncestry)).scalars()}  # fmt: skip
        particles = len(s.execute(select(Chain.id)).all())
    last = max(b for _, b in anc)
    lines: dict[int, list[tuple[int, int, int]]] = {}
    for leaf, block, chain, parent in rows:
        lines.setdefault(leaf, []).append((block, chain, parent))
    assert len(lines) == particles
    for leaf, line in lines.items():
        assert [b for b, _, _ in line] == list(range(last, 0, -1))
        assert line[0][1] == leaf
        for block, chain, parent in line:
            assert anc[(chain, block)] == parent
        for (_, _, parent), (_, nxt, _) in itertools.pairwise(line):
            assert parent == nxt  # each block's parent is the particle one block earlier


@pytest.mark.parametrize("died", ["before the barrier", "after the barrier"])
def test_particles_waiting_for_a_dead_process_are_brought_back_by_the_reaper(
    finished: tuple[str, Any], servers: Any, tmp_path: Path, died: str
) -> None:
    """Five particles wait at the barrier after block 0; the process of the sixth dies either
    right after committing its block 0 (nobody runs the barrier) or right after running the
    barrier (its wake-ups are lost). `qalign sweep reap`'s hints bring every waiting particle
    back, and the sweep ends with the uninterrupted run's rows."""
    _, whole = finished
    sessions = _open(f"sqlite:///{tmp_path / 'reaped.sqlite'}")
    create_sweep(sessions, parse_config(_smc_sweep("smc-a", *servers)))
    service = StepService(sessions)
    with sessions() as s:
        ids = list(s.execute(select(Chain.id).order_by(Chain.id)).scalars())
    waiting, last = ids[:5], ids[5]

    class Hints:
        """The reaper's broker: keeps the hints for the test to run."""

        def __init__(self) -> None:
            self.sent: list[tuple[int, int]] = []

        def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None:
            self.sent.append((chain_id, step))

        def enqueue_many(self, items: Any) -> int:
            items = list(items)
            self.sent += items
            return len(items)

    async def crash_then_reap() -> list[tuple[int, int]]:
        for cid in waiting:
            assert (await service.take(cid, 0)).result is Result.COMMITTED
            assert (await service.take(cid, 1)).result is Result.WAITING
        assert (await service.take(last, 0)).result is Result.COMMITTED
        if died == "after the barrier":
            out = await service.take(last, 1)
            assert out.result is Result.COMMITTED and {c for c, _ in out.wake} == set(waiting)
        # ... and the process dies here: nothing of it runs on, nothing it would hand on is sent
        hints = Hints()
        assert reap(sessions, hints, 0.0) == len(ids)

        async def handle(chain_id: int, step: int, ready_at: float) -> None:
            _, nxt = await drive(service, chain_id, step, on_wake=runner.enqueue_many)
            follow(runner, chain_id, nxt)

        runner = InProcessDispatcher(handle)  # the new process that takes the reaped hints
        runner.enqueue_many(hints.sent)
        try:
            await runner.join()
        finally:
            await service.close()
        return hints.sent

    sent = asyncio.run(crash_then_reap())
    assert {(cid, 1) for cid in waiting} <= set(sent)
    with sessions() as s:
        assert len(s.execute(select(SmcResample)).all()) == 3 * (block_count(4, 1) - 1)
    assert _rows(sessions) == whole


def test_a_particle_revived_after_its_siblings_went_on_fails_with_a_reason(
    servers: Any, tmp_path: Path
) -> None:
    """A particle that failed for good drops out of the next barrier; revived later
    (`--retry-failed`), it has no lineage to continue: it fails again at once, with a reason,
    and the run goes on (no exception out of the runner)."""
    from qalign.storage import repo

    sessions = _open(f"sqlite:///{tmp_path / 'revived.sqlite'}")
    sweep_id, _ = create_sweep(sessions, parse_config(_smc_sweep("smc-a", *servers)))
    service = StepService(sessions)
    with sessions() as s:
        dropped = s.execute(select(Chain.id).order_by(Chain.id)).scalars().first()
    assert dropped is not None

    async def go() -> None:
        try:
            assert (await service.take(dropped, 0)).result is Result.COMMITTED
            assert repo.record_failure(sessions, dropped, 1, "ServerError: gone", 1)[0] == "failed"
            await run_locally(service, sweep_id, progress=False)
            await run_locally(service, sweep_id, retry_failed=True, progress=False)
        finally:
            await service.close()

    asyncio.run(go())
    with sessions() as s:
        chains = s.execute(select(Chain)).scalars().all()
        by_status = {c.id: c.status for c in chains}
        lost = s.get(Chain, dropped)
        assert lost is not None and lost.last_error is not None
        assert "SMCLineageError" in lost.last_error and "--retry-failed" in lost.last_error
        first_barrier = s.execute(
            select(SmcResample).where(SmcResample.prompt_id == lost.prompt_id,
                                      SmcResample.block == 0)
        ).scalar_one()  # fmt: skip
    assert by_status.pop(dropped) == "failed"
    assert set(by_status.values()) == {"done"}
    assert first_barrier.particles == 5  # resampled among the live particles only


def test_siblings_waiting_for_a_revived_particle_are_woken_when_it_drops_out(
    servers: Any, tmp_path: Path
) -> None:
    """Revived mid-run, the particle is live and behind, so its siblings wait for it at the next
    barrier; when it finds it has no lineage it fails and hands them on."""
    from qalign.storage import repo

    sessions = _open(f"sqlite:///{tmp_path / 'revived.sqlite'}")
    sweep_id, _ = create_sweep(sessions, parse_config(_smc_sweep("smc-a", *servers)))
    service = StepService(sessions)
    with sessions() as s:
        dropped, *sibs = s.execute(select(Chain.id).order_by(Chain.id).limit(6)).scalars()

    async def go() -> Any:
        try:
            assert (await service.take(dropped, 0)).result is Result.COMMITTED
            assert repo.record_failure(sessions, dropped, 1, "ServerError: gone", 1)[0] == "failed"
            for step in (0, 1):  # the barrier after block 0 runs without the failed particle
                for cid in sibs:
                    assert (await service.take(cid, step)).result is Result.COMMITTED
            repo.unfinished_chains(sessions, sweep_id, retry_failed=True)  # revived
            for cid in sibs:
                assert (await service.take(cid, 2)).result is Result.WAITING
            out = await service.take(dropped, 1)
            await run_locally(service, sweep_id, progress=False)
            return out
        finally:
            await service.close()

    out = asyncio.run(go())
    assert out.result is Result.FAILED and out.chain_status == "failed"
    assert sorted(out.wake) == [(cid, 2) for cid in sibs]
    with sessions() as s:
        statuses = dict(s.execute(select(Chain.id, Chain.status)).all())
    assert statuses.pop(dropped) == "failed" and set(statuses.values()) == {"done"}
