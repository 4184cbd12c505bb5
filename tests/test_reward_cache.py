"""The reward cache scores each distinct conversation once and returns identical results."""

from __future__ import annotations

import asyncio

import pytest

from qalign.clients.cache import CachedReward


class CountingReward:
    model = "counting"

    def __init__(self) -> None:
        self.scored: list[str] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def score(self, conversations):
        self.scored += [c[-1]["content"] for c in conversations]
        return [float(len(c[-1]["content"])) for c in conversations]


def conv(text):
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]


def test_each_distinct_conversation_is_scored_once():
    inner = CountingReward()
    rm = CachedReward(inner, maxsize=2)

    async def go():
        a = await rm.score([conv("aa"), conv("b"), conv("aa")])
        b = await rm.score([conv("b")])
        c, tokens = await rm.score_with_tokens([conv("ccc")])
        d = await rm.score([conv("aa")])  # evicted by the LRU (maxsize 2): scored again
        return a, b, c, tokens, d

    a, b, c, tokens, d = asyncio.run(go())
    assert a == [2.0, 1.0, 2.0] and b == [1.0] and c == [3.0] and d == [2.0]
    assert tokens == [None]
    assert inner.scored == ["aa", "b", "ccc", "aa"]
    assert (rm.hits, rm.misses) == (2, 4)
    with pytest.raises(ValueError):
        CachedReward(inner, maxsize=0)


def test_sweep_steps_hit_the_cache(sqlite_url, tmp_path, toy):
    from qalign.config import parse_config
    from qalign.scheduler.local import run_locally
    from qalign.scheduler.sweeps import create_sweep
    from qalign.steps.service import StepService
    from qalign.storage import make_engine, make_sessionmaker, upgrade
    from tests.sweeps_support import check_invariants, sweep_config

    upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    cfg = parse_config(sweep_config("cached", *toy, prompts=1, beta=1.0, steps=10, chains=20))
    sweep_id, _ = create_sweep(sessions, cfg)
    services = StepService(sessions)

    async def go():
        try:
            await run_locally(services, sweep_id, progress=False)
            (rm,) = [c for c in services.clients._items.values() if isinstance(c, CachedReward)]
            return rm.hits, rm.misses
        finally:
            await services.close()

    hits, misses = asyncio.run(go())
    check_invariants(sqlite_url)
    assert misses <= 85  # the toy LM has 85 responses of at most 3 tokens
    assert hits > misses


class FlakyNanReward(CountingReward):
    """Answers NaN for its first `nans` requests (a reward server glitch), then real scores."""

    def __init__(self, nans: int) -> None:
        super().__init__()
        self.nans = nans

    async def score(self, conversations):
        scores = await super().score(conversations)
        if self.nans > 0:
            self.nans -= 1
            return [float("nan")] * len(scores)
        return scores


def test_a_transient_nan_is_not_cached():
    # A NaN rejects the proposal that received it; caching it would also reject every later
    # proposal of the same response in this process, which biases the chain.
    inner = FlakyNanReward(nans=1)
    rm = CachedReward(inner)

    async def go():
        first = await rm.score([conv("aa"), conv("aa")])
        second = await rm.score([conv("aa")])
        third = await rm.score([conv("aa")])
        return first, second, third

    first, second, third = asyncio.run(go())
    assert all(x != x for x in first)  # both copies of the glitched batch are NaN
    assert second == [2.0] and third == [2.0]
    assert inner.scored == ["aa", "aa"]  # re-asked once after the NaN, then cached
