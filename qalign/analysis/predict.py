"""Final answers and accuracy curves from checked samples: pure functions, no IO.

Two kinds of data feed these functions (`qalign.analysis.data` loads both from a sweep):

* **independent samples** (`Sample`): the responses of a `method: ancestral` run, one per chain.
  The baselines choose among the first-n or a random n of them:

  - `mv`   majority vote over the extracted answers (responses without an answer abstain);
  - `wmv`  weighted majority vote, each response weighing softmax(r / τ) (τ = `temperature`);
  - `bon`  best-of-n: the response with the highest reward (right or wrong, with or without an
    answer: BoN commits to that response);
  - `mbr`  minimum Bayes risk with ROUGE-1 F1 as the utility: the response whose mean ROUGE-1 F1
    to the other responses is highest (for IFEval-like tasks whose answers cannot be voted on).

* **chain trajectories** (`Trajectory`): QAlign / QUEST / power chains. `states[k]` is the
  chain's state after step k (the last accepted proposal at or before step k). QAlign's answer
  is the majority vote (or the MBR choice, `select="mbr"`) over the states left after dropping
  the first `burn_in` steps of each chain and keeping every `thin`-th state after that. Power
  chains (`method: power`, no reward) are voted on the same way (method `power`).

* **SMC particles** (`ParticleSet`): a prompt's final particles of a `method: smc` run (each
  particle's state after the last block) with their log weights, and what the whole run cost on
  that prompt. `smc` is the weighted majority vote, each particle weighing its self-normalised
  final weight exp(log_weight) (so the vote reads the weighted estimate of QAlign's target);
  `smc-mv` the plain majority vote of the particles. Zero-weight particles abstain from `smc`.

**Budgets.** A budget n is the number of generations spent on one prompt; each generation comes
with one reward evaluation when the method uses the reward model (WMV, BoN, QAlign; MV and MBR
never call it). For the baselines, n is the number of independent samples. For QAlign, n is the
number of chain steps (step 0, the initial sample, counts as one): the chains pooled into one
prediction share the budget round-robin (chain 0 gets steps 0, chain 1 gets its step 0, ...,
then every chain its step 1, ...), so with C chains of T + 1 states the budgets run up to
C·(T + 1), and n < C uses only the initial samples of the first n chains. A chain whose used
prefix is entirely burnt in votes with its last used state. `pool` splits a prompt's chains into
groups of that many chains (in `chain_index` order); each group makes its own prediction and
the prompt scores the mean over its groups (`pool=1`: one chain per prediction as in the
paper, averaged over the chains; default: all of a prompt's chains in one prediction).

SMC has a single budget per run, its N particles (`chains_per_prompt`): the particles interact
through resampling, so a subset of the final particles is not what a run of fewer particles
would give, and it would still have cost the whole run. Its cost is every block of every
particle (generated and reward-model tokens, server seconds), whether or not the particle's
lineage survived. Several sweeps with different `chains_per_prompt` trace an SMC curve.

**Subsets.** With a pool of N independent samples and a budget n < N, the prompt's accuracy is
the mean over `subsets` random n-subsets of the pool (seeded by `seed`, the prompt's key and n;
every subset keeps the pool's order, which decides ties). When C(N, n) <= `subsets` every subset
is enumerated, so the value is exact. `subsets=0` uses the first n samples instead (one
deterministic prediction per prompt).

**Intervals.** A curve point's interval is a percentile bootstrap over prompts: `resamples`
resamples of the prompts with replacement (seeded), the `confidence` central interval of the
resampled mean accuracy.

**Compute.** Every point reports the mean generated tokens and reward-model tokens per prompt
actually spent (the stored token counts of the samples or steps used), and FLOPs ≈ 2·params·tokens
per prompt when parameter counts are given (`params={"generator": 8e9, "reward": 8e9}`).
Prompt prefill is not counted: QAlign's continuations reuse the cached prefix, and every sample of
a prompt shares the prompt's prefix too.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from qalign.core.voting import best_of_n, majority_vote, weighted_vote

INDEPENDENT_METHODS = ("mv", "wmv", "bon", "mbr")
CHAIN_METHODS = ("qalign", "power")
SMC_METHODS = ("smc", "smc-mv")
METHODS = (*INDEPENDENT_METHODS, *CHAIN_METHODS, *SMC_METHODS)
# Whether the method's cost includes reward-model calls (SMC's plain vote still needed them to
# weight and resample the particles).
USES_REWARD = {"mv": False, "wmv": True, "bon": True, "mbr": False, "qalign": True,
               "power": False, "smc": True, "smc-mv": True}  # fmt: skip
DEFAULT_SUBSETS = 32
DEFAULT_RESAMPLES = 1000
K = TypeVar("K", bound=Hashable)  # a prompt key


@dataclass(frozen=True)
class Sample:
    """One checked response: its canonical answer (None: no answer found), whether it is right,
    its reward (NaN when it was not scored), and the tokens it cost."""

    answer: str | None
    correct: bool
    reward: float = math.nan
    gen_tokens: int = 0
    reward_tokens: int = 0
    text: str = ""
    # wall-clock seconds at the servers (proposals' generator_seconds / reward_seconds); None
    # on rows stored before those columns existed
    gen_seconds: float | None = None
    reward_seconds: float | None = None


@dataclass(frozen=True)
class Trajectory:
    """One chain. `states[k]` is the state after step k (the last accepted proposal at or before
    step k); `cum_gen_tokens[k]` and `cum_reward_tokens[k]` are the tokens spent on steps 0..k;
    `accepted[k]` says whether the proposal of step k was accepted (step 0 always is);
    `cum_seconds[k]` the generator + reward server seconds of steps 0..k (None: not measured
    for every step)."""

    states: tuple[Sample, ...]
    cum_gen_tokens: tuple[int, ...]
    cum_reward_tokens: tuple[int, ...]
    accepted: tuple[bool, ...]
    cum_seconds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.states)
        if not (len(self.cum_gen_tokens) == len(self.cum_reward_tokens) == len(self.accepted) == n):
            raise ValueError(
                "a trajectory's states, token counts and accept flags differ in length"
            )
        if self.cum_seconds is not None and len(self.cum_seconds) != n:
            raise ValueError("a trajectory's cum_seconds differ in length from its states")

    @property
    def length(self) -> int:
        return len(self.states)


@dataclass(frozen=True)
class ParticleSet:
    """A prompt's final SMC particles with their log weights (-inf: zero weight), and the
    generated tokens, reward-model tokens and server seconds (None: not measured for every
    block) that every block of every particle of the prompt cost."""

    particles: tuple[Sample, ...]
    log_weights: tuple[float, ...]
    gen_tokens: int
    reward_tokens: int
    seconds: float | None = None

    def __post_init__(self) -> None:
        if len(self.particles) != len(self.log_weights):
            raise ValueError("a particle set's particles and log weights differ in length")


@dataclass(frozen=True)
class Point:
    """One budget of an accuracy curve: mean accuracy over prompts with its bootstrap interval,
    and the mean compute per prompt (FLOPs None when the parameter counts are unknown; server
    seconds, generator + reward, None when some sample has no latency stored)."""

    budget: int
    accuracy: float
    ci_low: float
    ci_high: float
    prompts: int
    gen_tokens: float
    reward_tokens: float
    flops: float | None
    server_seconds: float | None = None


# ---- one prediction ------------------------------------------------------------------------


def answer_correct(answer: str | None, samples: Sequence[Sample]) -> bool:
    """Whether a chosen answer key is right: the verdict on the first sample that gave it."""
    if answer is None:
        return False
    for s in samples:
        if s.answer == answer:
            return s.correct
    raise ValueError(f"answer {answer!r} is not among the samples")


def mv_correct(samples: Sequence[Sample]) -> bool:
    """Majority vote over the answers (ties: the answer seen first; no answer abstains)."""
    return answer_correct(majority_vote([s.answer for s in samples]), samples)


def wmv_correct(samples: Sequence[Sample], temperature: float = 1.0) -> bool:
    """Weighted majority vote, weights softmax(reward / temperature); unscored samples abstain."""
    answers = [s.answer for s in samples]
    chosen = weighted_vote(answers, [s.reward for s in samples], temperature)
    return answer_correct(chosen, samples)


def bon_index(samples: Sequence[Sample]) -> int | None:
    """The index of the highest-reward sample (first on ties; unscored samples never win)."""
    return best_of_n(list(range(len(samples))), [s.reward for s in samples])


def bon_correct(samples: Sequence[Sample]) -> bool:
    i = bon_index(samples)
    return False if i is None else samples[i].correct


_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> tuple[str, ...]:
    """ROUGE tokenisation as in `rouge-score` without stemming: lowercase, runs of [a-z0-9]."""
    return tuple(_TOKEN.findall(text.lower()))


def rouge1_f1(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-1 F1 between two texts (or token sequences): unigram overlap with multiplicity.

    0 when either side has no tokens (as `rouge-score` scores it).
    """
    ta = rouge_tokens(a) if isinstance(a, str) else a
    tb = rouge_tokens(b) if isinstance(b, str) else b
    if not ta or not tb:
        return 0.0
    overlap = sum((Counter(ta) & Counter(tb)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(tb), overlap / len(ta)
    return 2 * precision * recall / (precision + recall)


class RougeCache:
    """Memoised ROUGE-1 F1 between texts (MBR compares the same texts many times)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[Counter[str], int]] = {}
        self._pairs: dict[tuple[str, str], float] = {}

    def _count(self, text: str) -> tuple[Counter[str], int]:
        got = self._counts.get(text)
        if got is None:
            toks = rouge_tokens(text)
            got = self._counts[text] = (Counter(toks), len(toks))
        return got

    def f1(self, a: str, b: str) -> float:
        key = (a, b) if a <= b else (b, a)
        got = self._pairs.get(key)
        if got is None:
            (ca, na), (cb, nb) = self._count(a), self._count(b)
            overlap = sum((ca & cb).values()) if na and nb else 0
            got = 0.0 if overlap == 0 else 2 * overlap / (na + nb)  # F1 = 2·overlap / (|a|+|b|)
            self._pairs[key] = got
        return got


def mbr_index(texts: Sequence[str], cache: RougeCache | None = None) -> int | None:
    """The index of the text with the highest mean ROUGE-1 F1 to the other texts (the other
    members of the multiset: a duplicate of a text counts as another text, with F1 1). Ties go
    to the first; a single text is chosen; None for no texts."""
    if not texts:
        return None
    if len(texts) == 1:
        return 0
    cache = cache or RougeCache()
    counts = Counter(texts)
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    best_i, best = 0, -math.inf
    for t, i in first.items():
        total = sum(c * cache.f1(t, u) for u, c in counts.items()) - cache.f1(t, t)
        score = total / (len(texts) - 1)
        if score > best + 1e-12:
            best_i, best = i, score
    return best_i


def mbr_correct(samples: Sequence[Sample], cache: RougeCache | None = None) -> bool:
    i = mbr_index([s.text for s in samples], cache)
    return False if i is None else samples[i].correct


def select_correct(
    method: str,
    samples: Sequence[Sample],
    *,
    temperature: float = 1.0,
    cache: RougeCache | None = None,
) -> bool:
    """Whether `method` (mv, wmv, bon, mbr) picks a right answer from these samples."""
    if method == "mv":
        return mv_correct(samples)
    if method == "wmv":
        return wmv_correct(samples, temperature)
    if method == "bon":
        return bon_correct(samples)
    if method == "mbr":
        return mbr_correct(samples, cache)
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(INDEPENDENT_METHODS)}")


# ---- QAlign --------------------------------------------------------------------------------


def split_budget(lengths: Sequence[int], budget: int) -> list[int]:
    """How many leading states of each chain a budget of `budget` steps buys, round-robin.

    Chains are filled level by level (every chain's step 0, then every chain's step 1, ...), in
    order within a level; a chain with no more states drops out. `sum(result) ==
    min(budget, sum(lengths))`.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    total = sum(lengths)
    if budget >= total:
        return list(lengths)
    # The largest full level h with sum(min(L, h)) <= budget, then one more state for the first
    # chains that still have one.
    lo, hi = 0, max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    used = [min(n, lo) for n in lengths]
    left = budget - sum(used)
    for j, n in enumerate(lengths):
        if left == 0:
            break
        if n > lo:
            used[j] += 1
            left -= 1
    return used


def kept_steps(used: int, burn_in: int = 0, thin: int = 1) -> range:
    """The steps of a chain prefix of `used` states that vote: burn_in, burn_in + thin, ...;
    when burn-in leaves none, the prefix's last state."""
    if burn_in < 0 or thin < 1:
        raise ValueError(f"need burn_in >= 0 and thin >= 1, got {burn_in} and {thin}")
    if used <= 0:
        return range(0)
    kept = range(burn_in, used, thin)
    return kept if len(kept) else range(used - 1, used)


def qalign_votes(
    chains: Sequence[Trajectory], budget: int, *, burn_in: int = 0, thin: int = 1
) -> tuple[list[Sample], int, int]:
    """The states that vote under a budget (pooled over `chains`), with the generated and
    reward-model tokens the budget spent."""
    used = split_budget([c.length for c in chains], budget)
    votes: list[Sample] = []
    gen = rm = 0
    for chain, k in zip(chains, used, strict=True):
        if k == 0:
            continue
        votes.extend(chain.states[i] for i in kept_steps(k, burn_in, thin))
        gen += chain.cum_gen_tokens[k - 1]
        rm += chain.cum_reward_tokens[k - 1]
    return votes, gen, rm


def qalign_seconds(chains: Sequence[Trajectory], budget: int) -> float | None:
    """The generator + reward server seconds a budget spent (as `qalign_votes` splits it);
    None when a chain used has no measurement."""
    used = split_budget([c.length for c in chains], budget)
    total = 0.0
    for chain, k in zip(chains, used, strict=True):
        if k == 0:
            continue
        if chain.cum_seconds is None:
            return None
        total += chain.cum_seconds[k - 1]
    return total


def _sample_seconds(samples: Sequence[Sample], uses_rm: bool) -> float | None:
    total = 0.0
    for s in samples:
        if s.gen_seconds is None or (uses_rm and s.reward_seconds is None):
            return None
        total += s.gen_seconds + ((s.reward_seconds or 0.0) if uses_rm else 0.0)
    return total


def qalign_correct(
    chains: Sequence[Trajectory],
    budget: int,
    *,
    burn_in: int = 0,
    thin: int = 1,
    select: str = "mv",
    cache: RougeCache | None = None,
) -> bool:
    """Whether QAlign's answer (majority vote, or MBR with `select="mbr"`) is right."""
    votes, _, _ = qalign_votes(chains, budget, burn_in=burn_in, thin=thin)
    if select == "mv":
        return mv_correct(votes)
    if select == "mbr":
        return mbr_correct(votes, cache)
    raise ValueError(f"unknown QAlign selection {select!r}; expected mv or mbr")


# ---- SMC -----------------------------------------------------------------------------------


def smc_answer(ps: ParticleSet, *, weighted: bool = True) -> str | None:
    """The weighted (self-normalised exp(log_weight)) or plain majority vote of the particles;
    zero-weight particles and particles without an answer abstain from the weighted vote."""
    answers = [s.answer for s in ps.particles]
    if not weighted:
        return majority_vote(answers)
    live = [(a, w) for a, w in zip(answers, ps.log_weights, strict=True) if w > -math.inf]
    if not live:
        return None
    # softmax(log w) is the self-normalised weight, so a weighted vote at temperature 1 is it.
    return weighted_vote([a for a, _ in live], [w for _, w in live], 1.0)


def smc_correct(ps: ParticleSet, *, weighted: bool = True) -> bool:
    """Whether the SMC vote (`smc_answer`) is right."""
    return answer_correct(smc_answer(ps, weighted=weighted), ps.particles)


# ---- curves ----------------------------------------------------------------------------------


def default_budgets(max_budget: int) -> list[int]:
    """Powers of two up to `max_budget`, and `max_budget` itself."""
    if max_budget < 1:
        return []
    out = [1 << k for k in range(max_budget.bit_length()) if 1 << k <= max_budget]
    if out[-1] != max_budget:
        out.append(max_budget)
    return out


def parse_budgets(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (sorted, unique, each >= 1)."""
    try:
        values = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    except ValueError as exc:
        raise ValueError(f"budgets must be comma-separated integers, got {text!r}") from exc
    if not values or values[0] < 1:
        raise ValueError(f"budgets must be integers >= 1, got {text!r}")
    return values


def flops(
    gen_tokens: float, reward_tokens: float, params: Mapping[str, float] | None
) -> float | None:
    """2·params·tokens for the generator plus the reward model; None when a count is missing."""
    if not params or params.get("generator") is None:
        return None
    rm = params.get("reward")
    if reward_tokens > 0 and rm is None:
        return None
    return 2.0 * params["generator"] * gen_tokens + 2.0 * (rm or 0.0) * reward_tokens


def bootstrap_ci(
    values: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean over resampled items.

    With no values everything is NaN; with `resamples=0` the interval is NaN.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if resamples <= 0:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 2_000_000 // x.size)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def subsets_of(size: int, n: int, subsets: int, rng_key: str) -> list[tuple[int, ...]]:
    """The index subsets a budget n is averaged over, for a pool of `size` samples.

    `subsets=0`: the first n. Otherwise every n-subset when there are at most `subsets` of them,
    else `subsets` random ones drawn with `random.Random(rng_key)`; each sorted (pool order).
    """
    n = min(n, size)
    if n <= 0:
        return []
    if subsets <= 0 or n == size:
        return [tuple(range(n))]
    if math.comb(size, n) <= subsets:
        return list(itertools.combinations(range(size), n))
    rng = random.Random(rng_key)
    return [tuple(sorted(rng.sample(range(size), n))) for _ in range(subsets)]


_Row = tuple[float, float, float, float | None]  # accuracy, gen tokens, RM tokens, seconds


def _point(
    budget: int,
    per_prompt: Sequence[_Row],
    *,
    params: Mapping[str, float] | None,
    resamples: int,
    seed: int,
    confidence: float,
) -> Point:
    """A curve point from (accuracy, generated tokens, reward tokens, server seconds or None)
    per prompt."""
    values = [row[0] for row in per_prompt]
    acc, lo, hi = bootstrap_ci(values, resamples=resamples, seed=seed, confidence=confidence)
    gen = float(np.mean([row[1] for row in per_prompt])) if per_prompt else math.nan
    rm = float(np.mean([row[2] for row in per_prompt])) if per_prompt else math.nan
    secs = [row[3] for row in per_prompt if row[3] is not None]
    seconds = float(np.mean(secs)) if secs and len(secs) == len(per_prompt) else None
    return Point(
        budget=budget,
        accuracy=acc,
        ci_low=lo,
        ci_high=hi,
        prompts=len(values),
        gen_tokens=gen,
        reward_tokens=rm,
        flops=None if not values else flops(gen, rm, params),
        server_seconds=seconds,
    )


def independent_curve(
    pools: Mapping[K, Sequence[Sample]],
    method: str,
    budgets: Sequence[int] | None = None,
    *,
    temperature: float = 1.0,
    subsets: int = DEFAULT_SUBSETS,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    params: Mapping[str, float] | None = None,
) -> list[Point]:
    """Accuracy of a baseline (mv, wmv, bon, mbr) per budget over each prompt's sample pool.

    `pools` maps a prompt key to its samples in pool order. Budgets default to the powers of
    two up to the largest pool; a prompt with fewer samples than a budget uses all it has.
    """
    if method not in INDEPENDENT_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {INDEPENDENT_METHODS}")
    pools = {k: v for k, v in pools.items() if v}
    if budgets is None:
        budgets = default_budgets(max((len(v) for v in pools.values()), default=0))
    uses_rm = USES_REWARD[method]
    # Per budget, per prompt: (accuracy, generated tokens, reward tokens), prompt by prompt so
    # the ROUGE cache (MBR) holds one prompt's texts at a time.
    table: list[list[_Row]] = [[] for _ in budgets]
    for key, pool in pools.items():
        cache = RougeCache() if method == "mbr" else None
        for row, n in zip(table, budgets, strict=True):
            picks = subsets_of(len(pool), n, subsets, f"{seed}/{key!r}/{n}")
            right = gen = rm = 0.0
            secs: float | None = 0.0
            for idx in picks:
                chosen = [pool[i] for i in idx]
                right += select_correct(method, chosen, temperature=temperature, cache=cache)
                gen += sum(s.gen_tokens for s in chosen)
                rm += sum(s.reward_tokens for s in chosen) if uses_rm else 0
                spent = _sample_seconds(chosen, uses_rm)
                secs = None if secs is None or spent is None else secs + spent
            k = len(picks)
            row.append((right / k, gen / k, rm / k, None if secs is None else secs / k))
    return [
        _point(n, row, params=params, resamples=resamples, seed=seed, confidence=confidence)
        for n, row in zip(budgets, table, strict=True)
    ]


def chain_groups(chains: Sequence[Trajectory], pool: int | None) -> list[Sequence[Trajectory]]:
    """A prompt's chains in groups of `pool` (None: one group); a short remainder is dropped
    unless it is the only group."""
    if pool is None or pool >= len(chains):
        return [chains] if chains else []
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    return [chains[i : i + pool] for i in range(0, len(chains) - pool + 1, pool)]


def qalign_max_budget(chains: Mapping[K, Sequence[Trajectory]], pool: int | None) -> int:
    """The largest budget any prompt's chain groups can spend."""
    return max(
        (sum(c.length for c in g) for cs in chains.values() for g in chain_groups(cs, pool)),
        default=0,
    )


def qalign_curve(
    chains: Mapping[K, Sequence[Trajectory]],
    budgets: Sequence[int] | None = None,
    *,
    burn_in: int = 0,
    thin: int = 1,
    pool: int | None = None,
    select: str = "mv",
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    params: Mapping[str, float] | None = None,
) -> list[Point]:
    """Accuracy of QAlign per budget (total steps per prediction, see the module docstring)."""
    chains = {k: v for k, v in chains.items() if v}
    if budgets is None:
        budgets = default_budgets(qalign_max_budget(chains, pool))
    if select not in ("mv", "mbr"):
        raise ValueError(f"unknown QAlign selection {select!r}; expected mv or mbr")
    table: list[list[_Row]] = [[] for _ in budgets]
    for cs in chains.values():
        groups = chain_groups(cs, pool)
        cache = RougeCache() if select == "mbr" else None
        for row, n in zip(table, budgets, strict=True):
            right = gen = rm = 0.0
            secs: float | None = 0.0
            for g in groups:
                votes, g_tok, r_tok = qalign_votes(g, n, burn_in=burn_in, thin=thin)
                right += mv_correct(votes) if select == "mv" else mbr_correct(votes, cache)
                gen += g_tok
                rm += r_tok
                spent = qalign_seconds(g, n)
                secs = None if secs is None or spent is None else secs + spent
            k = len(groups)
            row.append((right / k, gen / k, rm / k, None if secs is None else secs / k))
    return [
        _point(n, row, params=params, resamples=resamples, seed=seed, confidence=confidence)
        for n, row in zip(budgets, table, strict=True)
    ]


def smc_curve(
    sets: Mapping[K, ParticleSet],
    budget: int,
    *,
    method: str = "smc",
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    params: Mapping[str, float] | None = None,
) -> list[Point]:
    """SMC's single point (`budget`: the run's particles per prompt; see the module docstring):
    `smc` votes with the final weights, `smc-mv` without; the cost is the whole run's."""
    if method not in SMC_METHODS:
        raise ValueError(f"unknown SMC method {method!r}; expected one of {SMC_METHODS}")
    rows: list[_Row] = [
        (
            float(smc_correct(ps, weighted=method == "smc")),
            float(ps.gen_tokens),
            float(ps.reward_tokens),
            ps.seconds,
        )
        for ps in sets.values()
        if ps.particles
    ]
    if not rows:
        return []
    return [_point(budget, rows, params=params, resamples=resamples, seed=seed,
                   confidence=confidence)]  # fmt: skip


# ---- traces --------------------------------------------------------------------------------


def mean_state_reward(chains: Sequence[Trajectory]) -> list[tuple[int, float, int]]:
    """(step, mean reward of the chains' states after that step, chains counted) per step;
    states without a reward are left out."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for c in chains:
        for k, s in enumerate(c.states):
            if not math.isnan(s.reward):
                sums[k] = sums.get(k, 0.0) + s.reward
                counts[k] = counts.get(k, 0) + 1
    return [(k, sums[k] / counts[k], counts[k]) for k in sorted(sums)]


def acceptance_by_step(chains: Sequence[Trajectory]) -> list[tuple[int, float, int]]:
    """(step, fraction of the chains' proposals accepted at that step, proposals) for k >= 1."""
    acc: dict[int, int] = {}
    counts: dict[int, int] = {}
    for c in chains:
        for k in range(1, c.length):
            acc[k] = acc.get(k, 0) + c.accepted[k]
            counts[k] = counts.get(k, 0) + 1
    return [(k, acc[k] / counts[k], counts[k]) for k in sorted(counts)]


__all__ = [
    "CHAIN_METHODS",
    "INDEPENDENT_METHODS",
    "METHODS",
    "SMC_METHODS",
    "USES_REWARD",
    "ParticleSet",
    "Point",
    "RougeCache",
    "Sample",
    "Trajectory",
    "acceptance_by_step",
    "answer_correct",
    "bon_correct",
    "bon_index",
    "bootstrap_ci",
    "chain_groups",
    "default_budgets",
    "flops",
    "independent_curve",
    "kept_steps",
    "mbr_correct",
    "mbr_index",
    "mean_state_reward",
    "mv_correct",
    "parse_budgets",
    "qalign_correct",
    "qalign_curve",
    "qalign_max_budget",
    "qalign_seconds",
    "qalign_votes",
    "rouge1_f1",
    "rouge_tokens",
    "select_correct",
    "smc_answer",
    "smc_correct",
    "smc_curve",
    "split_budget",
    "subsets_of",
    "wmv_correct",
]
