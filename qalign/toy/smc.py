"""SMC on the toy model's exact probabilities, without servers or storage.

The same weight update and resampling as stored SMC runs (`qalign.core.smc`), with blocks drawn
from `ToyModel.next_probs`: fast enough for the thousands of independent runs an exactness test
pools. `update` can be replaced to show that a wrong weight update fails that test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from qalign.core.smc import block_count, increment, resample
from qalign.toy.model import EOS, ToyModel

Update = Callable[[float, float, float], float]  # (beta, reward, previous reward) -> log increment


def _extend(
    model: ToyModel, tokens: tuple[int, ...], budget: int, rng: random.Random
) -> tuple[int, ...]:
    out = list(tokens)
    for _ in range(budget):
        probs = model.next_probs(out[-1] if out else None)
        ids = list(probs)
        tok = rng.choices(ids, weights=[probs[t] for t in ids])[0]
        out.append(tok)
        if tok == EOS:
            break
    return tuple(out)


def simulate(
    model: ToyModel,
    *,
    beta: float,
    max_new_tokens: int,
    block_tokens: int,
    particles: int,
    ess_threshold: float,
    rng: random.Random,
    update: Update = increment,
) -> list[tuple[tuple[int, ...], float]]:
    """One SMC run for one prompt: the final particles as (response, log weight)."""
    states: list[tuple[int, ...]] = [()] * particles
    rewards = [0.0] * particles
    logw = [0.0] * particles
    blocks = block_count(max_new_tokens, block_tokens)
    for block in range(blocks):
        if block > 0:
            plan = resample(logw, ess_threshold, rng.random())
            states = [states[j] for j in plan.parents]
            rewards = [rewards[j] for j in plan.parents]
            logw = list(plan.log_weights)
        for i in range(particles):
            y = states[i]
            if y and (y[-1] == EOS or len(y) >= max_new_tokens):
                continue  # finished: a no-op block
            budget = min(block_tokens, max_new_tokens - len(y))
            y = _extend(model, y, budget, rng)
            r = model.reward(y)
            logw[i] += update(beta, r, rewards[i])
            states[i], rewards[i] = y, r
    return list(zip(states, logw, strict=True))


def pooled(runs: list[list[tuple[tuple[int, ...], float]]]) -> dict[tuple[int, ...], float]:
    """The law of independent runs' particles pooled by their raw weights (see `core.smc`)."""
    top = max((w for run in runs for _, w in run), default=0.0)
    mass: dict[tuple[int, ...], float] = {}
    for run in runs:
        for y, w in run:
            mass[y] = mass.get(y, 0.0) + math.exp(w - top)
    total = math.fsum(mass.values())
    return {y: m / total for y, m in mass.items()}


def pooled_sd(
    runs: list[list[tuple[tuple[int, ...], float]]], law: dict[tuple[int, ...], float]
) -> dict[tuple[int, ...], float]:
    """Each cell's standard error of `pooled` (a ratio estimator; runs are the independent units).

    p̂(y) = Σ_r a_r(y) / Σ_r b_r with a_r the run's weight on y and b_r its total weight, so by
    the delta method Var p̂(y) ≈ Σ_r (a_r(y) - p̂(y) b_r)² / (Σ_r b_r)².
    """
    top = max((w for run in runs for _, w in run), default=0.0)
    totals: list[float] = []
    per_run: list[dict[tuple[int, ...], float]] = []
    for run in runs:
        a: dict[tuple[int, ...], float] = {}
        for y, w in run:
            a[y] = a.get(y, 0.0) + math.exp(w - top)
        per_run.append(a)
        totals.append(math.fsum(a.values()))
    grand = math.fsum(totals)
    out: dict[tuple[int, ...], float] = {}
    for y, p in law.items():
        sq = math.fsum((a.get(y, 0.0) - p * b) ** 2 for a, b in zip(per_run, totals, strict=True))
        out[y] = math.sqrt(sq) / grand
    return out
