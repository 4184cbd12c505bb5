"""Exact MCMC transition kernels on the toy model, for checking the sampler against the math.

The kernel is enumerated from the same pure functions the sampler uses (`qalign.core`), with the
toy LM's exact conditional probabilities; `step_distribution` then gives the exact law of a chain
after k steps, so an empirical histogram can be compared with it without any mixing slack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from qalign.core import KernelConfig, Method, State, StepPlan, decide, make_proposal
from qalign.core.state import Finish
from qalign.toy.model import EOS, ToyModel

Response = tuple[int, ...]
Dist = dict[Response, float]


def _finish(y: Response) -> Finish:
    return Finish.STOP if y and y[-1] == EOS else Finish.LENGTH


RewardFn = Callable[[Response], float]


def _unscored(y: Response) -> float:
    return math.nan


def _state(model: ToyModel, y: Response, temperature: float, reward: RewardFn) -> State:
    lps = tuple(
        math.log(model.next_probs(y[i - 1] if i else None, temperature)[y[i]])
        for i in range(len(y))
    )
    return State(tokens=y, reward=reward(y), finish=_finish(y), logprobs=lps)


def transition_matrix(
    model: ToyModel,
    cfg: KernelConfig,
    temperature: float = 1.0,
    reward: RewardFn | None = None,
) -> dict[Response, Dist]:
    """P[y][y'] for every pair of responses under the kernel `cfg` (rows sum to 1).

    `reward` replaces the model's own reward (e.g. a composite of several toy rewards).
    """
    ys = model.responses(cfg.max_new_tokens)
    reward_of = model.reward if reward is None else reward
    if not cfg.needs_reward:
        # Unscored, as the step function leaves them: the kernel must not look at rewards.
        reward_of = _unscored
    states = {y: _state(model, y, temperature, reward_of) for y in ys}
    lm_cond = {y: {} for y in ys}  # type: dict[Response, dict[int, float]]
    for y in ys:
        for i in range(len(y) + 1):
            lm_cond[y][i] = math.exp(model.sequence_logprob(y, i, temperature))
    matrix: dict[Response, Dist] = {}
    for y in ys:
        cur = states[y]
        row: Dist = {}
        n_slots = max(len(y), 1)
        for i in range(n_slots):
            q_i = math.exp(cfg.index.log_prob(i, len(y)))
            if q_i == 0.0:
                continue
            prefix = y[:i]
            plan = StepPlan(1, i, prefix, cfg.max_new_tokens - i, 0, 0.0)
            for y2 in ys:
                if y2[:i] != prefix or len(y2) <= i:
                    continue
                q_suffix = lm_cond[y2][i]
                if q_suffix == 0.0:
                    continue
                s2 = states[y2]
                lps = s2.logprobs[i:] if s2.logprobs is not None else None
                prop = make_proposal(plan, cur, y2[i:], s2.finish, s2.reward, lps)
                alpha = decide(cfg, plan, cur, prop).alpha
                row[y2] = row.get(y2, 0.0) + q_i * q_suffix * alpha
        row[y] = row.get(y, 0.0) + max(0.0, 1.0 - math.fsum(row.values()))
        matrix[y] = row
    return matrix


def step_distribution(
    start: Mapping[Response, float], matrix: Mapping[Response, Dist], k: int
) -> Dist:
    """The law of the chain after k steps from `start`."""
    dist = dict(start)
    for _ in range(k):
        nxt: Dist = {}
        for y, p in dist.items():
            if p == 0.0:
                continue
            for y2, t in matrix[y].items():
                nxt[y2] = nxt.get(y2, 0.0) + p * t
        dist = nxt
    return dist


def total_variation(p: Mapping[Response, float], q: Mapping[Response, float]) -> float:
    keys = set(p) | set(q)
    return 0.5 * math.fsum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def tv_bound(p: Mapping[Response, float], n: int, delta: float = 1e-3) -> float:
    """A high-probability bound on TV(empirical of n draws from p, p).

    E[TV] <= 1/2 Σ sqrt(p(1-p)/n) (Jensen per cell), and TV is 1/n-Lipschitz in each draw, so by
    McDiarmid it exceeds its mean by more than sqrt(ln(1/delta) / (2n)) with probability < delta.
    """
    mean = 0.5 * math.fsum(math.sqrt(v * (1 - v) / n) for v in p.values())
    return mean + math.sqrt(math.log(1 / delta) / (2 * n))


def empirical(samples: list[Response]) -> Dist:
    out: Dist = {}
    for s in samples:
        out[s] = out.get(s, 0.0) + 1.0 / len(samples)
    return out


__all__ = [
    "Method",
    "empirical",
    "step_distribution",
    "total_variation",
    "transition_matrix",
    "tv_bound",
]
