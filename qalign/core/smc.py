"""Sequential Monte Carlo over responses (`method: smc`), as pure functions.

N particles of one prompt grow in blocks of `block_tokens` tokens drawn from the LM itself.
After block t a particle with partial response y_{1:t} carries the potential
G_t = exp(r(x, y_{1:t}) / beta) (the reward model on the unfinished response), and its log
weight grows by log G_t - log G_{t-1} (G_{-1} = 1). A finished particle (EOS, or
`max_new_tokens` reached) stops growing and its weight stops changing. Along any lineage the
increments telescope to r(x, y)/beta of the complete response, and the proposal is p_LM, so
the weighted final particles target p_LM(y|x)·exp(r(x,y)/beta): QAlign's target, whatever the
intermediate potentials are.

Between blocks the particles are resampled systematically when the effective sample size falls
below `ess_threshold`·N. A resampled particle restarts from its parent's state with the log
mean weight of the generation (not 0): the weights then keep the normalising-constant estimate
Ẑ = mean of the final weights, so estimates pooled over independent runs by their raw weights
are consistent for a fixed N (a self-normalised estimate per run carries an O(1/N) bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qalign.core.rng import Purpose, uniform
from qalign.core.state import Finish, State


def block_count(max_new_tokens: int, block_tokens: int) -> int:
    """Blocks needed to reach `max_new_tokens`: a run's steps are 0 .. block_count - 1."""
    if block_tokens < 1 or max_new_tokens < 1:
        raise ValueError("block_tokens and max_new_tokens must be >= 1")
    return -(-max_new_tokens // block_tokens)


def is_complete(state: State, max_new_tokens: int) -> bool:
    """A particle stops growing once it ended on EOS or used the whole token budget."""
    return state.finish is Finish.STOP or len(state) >= max_new_tokens


def increment(beta: float, reward: float, previous: float) -> float:
    """log G_t - log G_{t-1}; a non-finite reward kills the particle (log weight -inf)."""
    if not math.isfinite(reward):
        return -math.inf
    return (reward - previous) / beta


def logsumexp(xs: Sequence[float]) -> float:
    top = max(xs, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(x - top) for x in xs))


def normalised(log_weights: Sequence[float]) -> list[float]:
    """Weights summing to 1 (all zero when every particle is dead)."""
    total = logsumexp(log_weights)
    if total == -math.inf:
        return [0.0] * len(log_weights)
    return [math.exp(w - total) for w in log_weights]


def ess(log_weights: Sequence[float]) -> float:
    """Kish's effective sample size 1 / Σ w_i² of the normalised weights (0 if all dead)."""
    w = normalised(log_weights)
    squares = math.fsum(x * x for x in w)
    return 1.0 / squares if squares > 0 else 0.0


def systematic(weights: Sequence[float], u: float) -> list[int]:
    """Systematic resampling: parent index of each of N offspring, from one uniform u in [0, 1).

    Offspring i takes the particle whose cumulative weight interval holds (i + u) / N, so
    particle j gets floor or ceil of N·w_j offspring and the parents come out sorted.
    """
    n = len(weights)
    out: list[int] = []
    cum, j = weights[0], 0
    for i in range(n):
        point = (i + u) / n
        while point >= cum and j < n - 1:
            j += 1
            cum += weights[j]
        out.append(j)
    return out


@dataclass(frozen=True)
class Resampling:
    """What the barrier after one block decided for a prompt's particles."""

    parents: tuple[int, ...]  # for each particle position, the position of its parent
    log_weights: tuple[float, ...]  # each particle's log weight as it starts the next block
    ess: float
    resampled: bool


def resample(log_weights: Sequence[float], threshold: float, u: float) -> Resampling:
    """Resample when ESS < threshold·N (and some particle is alive), else keep every lineage."""
    n = len(log_weights)
    e = ess(log_weights)
    total = logsumexp(log_weights)
    if n == 0 or total == -math.inf or e >= threshold * n:
        return Resampling(tuple(range(n)), tuple(log_weights), e, False)
    parents = systematic(normalised(log_weights), u)
    mean = total - math.log(n)
    return Resampling(tuple(parents), (mean,) * n, e, True)


def resample_uniform(seed: int, prompt_key: str, block: int) -> float:
    """The uniform of the resampling after `block` of one prompt of one run (stable keys)."""
    return uniform(seed, f"smc/{prompt_key}", block, Purpose.RESAMPLE)


def prompt_key(rng_key: str) -> str:
    """A prompt's stable key within a sweep, from one of its chains' `rng_key` (grid/prompt/k)."""
    return rng_key.rsplit("/", 1)[0]


def weighted_law(
    particles: Sequence[tuple[tuple[int, ...], float]],
) -> dict[tuple[int, ...], float]:
    """The normalised weighted empirical law of (response, log weight) pairs."""
    w = normalised([lw for _, lw in particles])
    out: dict[tuple[int, ...], float] = {}
    for (y, _), x in zip(particles, w, strict=True):
        if x > 0:
            out[y] = out.get(y, 0.0) + x
    return out
