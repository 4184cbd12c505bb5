"""The QAlign / QUEST Metropolis-Hastings kernel over responses, as pure functions.

One step of a chain at state y:
  1. `plan_step` draws a cut i from the index distribution and fixes the generator seed and the
     acceptance uniform, all from (run seed, chain, step);
  2. the caller asks the generator to continue the prompt + y[:i] with at most
     `max_new_tokens - i` new tokens and scores the result (IO lives outside this module);
  3. `make_proposal` assembles y' = y[:i] + new tokens, `decide` accepts or rejects it.

Targets: QAlign pi(y) ∝ p_LM(y|x)·exp(r(x,y)/beta); QUEST pi(y) ∝ exp(r(x,y)/beta); power
sampling pi(y) ∝ p_LM(y|x)^alpha (no reward), all over responses of at most `max_new_tokens`
tokens (a response that hits the cap is a valid state whose LM probability is the product of its
token probabilities).

Power sampling's ratio, with the proposal q(y'|y) = P(i|y)·p(y'[i:]|y[:i]) at temperature 1:
the shared prefix cancels in p(y')^alpha / p(y)^alpha, leaving
  log A = alpha·(log p(y'[i:]|y[:i]) - log p(y[i:]|y[:i]))      (target)
        + log p(y[i:]|y[:i]) - log p(y'[i:]|y[:i])              (reverse / forward proposal)
        + log P(i|y') - log P(i|y)                              (index)
so it needs the generator's per-token log-probs of both suffixes, which every state carries.
Those log-probs must be of p itself: a tempered proposal p_T would need both p and p_T per token
(p_T's normaliser is not a function of p's token log-prob), and a server reports only one kind,
so power chains sample at temperature 1 (`ChainSpec` refuses anything else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from qalign.core.index import IndexDistribution, Uniform, index_distribution
from qalign.core.rng import Purpose, generator_seed, uniform
from qalign.core.state import Finish, State


class Method(StrEnum):
    """Which target the chain samples from."""

    QALIGN = "qalign"  # p_LM(y|x) exp(r/beta): the LM is the proposal and part of the target
    QUEST = "quest"  # exp(r/beta): the proposal's suffix probabilities enter the ratio
    POWER = "power"  # p_LM^alpha: no reward; the suffix log-probs enter with weight alpha - 1


class RejectReason(StrEnum):
    """Why a proposal was rejected without (or before) the Metropolis-Hastings coin."""

    NON_FINITE_REWARD = "non_finite_reward"
    EMPTY_CONTINUATION = "empty_continuation"
    OVER_BUDGET = "over_budget"
    EARLY_LENGTH_STOP = "early_length_stop"
    MISSING_LOGPROBS = "missing_logprobs"
    IRREVERSIBLE = "irreversible"
    NON_FINITE_LOGPROB = "non_finite_logprob"


@dataclass(frozen=True)
class KernelConfig:
    """Everything that defines the target and the proposal of a chain.

    `alpha` is power sampling's exponent (not the acceptance probability `Decision.alpha`);
    `beta` is unused by power sampling.
    """

    beta: float
    max_new_tokens: int
    method: Method = Method.QALIGN
    index: IndexDistribution = field(default_factory=Uniform)
    clamp: float = 20.0
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite number, got {self.beta!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not (self.clamp > 0):
            raise ValueError(f"clamp must be > 0, got {self.clamp!r}")
        if self.method is Method.POWER:
            if self.alpha is None or not (math.isfinite(self.alpha) and self.alpha > 0):
                raise ValueError(
                    f"power sampling needs alpha, a positive finite number, got {self.alpha!r}"
                )
        elif self.alpha is not None:
            raise ValueError(f"alpha is power sampling's exponent; method {self.method.value!r}")

    @property
    def needs_logprobs(self) -> bool:
        return self.method in (Method.QUEST, Method.POWER)

    @property
    def needs_reward(self) -> bool:
        return self.method is not Method.POWER


def kernel_config(
    method: str,
    *,
    beta: float | None,
    max_new_tokens: int,
    index: str = "uniform",
    clamp: float = 20.0,
    alpha: float | None = None,
) -> KernelConfig:
    """The kernel of a method named as in a sweep config or the seed API.

    `ancestral` runs take only the initial LM sample, so their kernel is QAlign's with beta 1
    (unused); `qalign` and `quest` need a beta, `power` an alpha.
    """
    if method == "ancestral":
        return KernelConfig(beta=1.0, max_new_tokens=max_new_tokens, clamp=clamp)
    try:
        kind = Method(method)
    except ValueError:
        raise ValueError(
            f"unknown method {method!r}; choose 'qalign', 'quest', 'power' or 'ancestral'"
        ) from None
    if kind is Method.POWER:
        return KernelConfig(
            beta=1.0,
            max_new_tokens=max_new_tokens,
            method=kind,
            index=index_distribution(index),
            clamp=clamp,
            alpha=alpha,
        )
    if beta is None:
        raise ValueError(f"method {method!r} needs a beta")
    return KernelConfig(
        beta=beta,
        max_new_tokens=max_new_tokens,
        method=kind,
        index=index_distribution(index),
        clamp=clamp,
    )


@dataclass(frozen=True)
class StepPlan:
    """The random decisions of one step, fixed before any IO."""

    step: int
    cut: int
    prefix: tuple[int, ...]
    max_tokens: int
    gen_seed: int
    u_accept: float


@dataclass(frozen=True)
class Decision:
    """Outcome of the accept/reject test. `alpha` is never NaN."""

    log_a: float
    alpha: float
    accepted: bool
    reason: RejectReason | None = None


def plan_initial(cfg: KernelConfig, seed: int, chain: str | int) -> StepPlan:
    """Step 0: an ancestral sample from the prompt, with the whole budget."""
    return StepPlan(
        step=0,
        cut=0,
        prefix=(),
        max_tokens=cfg.max_new_tokens,
        gen_seed=generator_seed(seed, chain, 0),
        u_accept=0.0,
    )


def plan_step(cfg: KernelConfig, state: State, seed: int, chain: str | int, step: int) -> StepPlan:
    """Draw the cut for step `step` (>= 1) from the current state."""
    if step < 1:
        raise ValueError(f"MCMC steps are numbered from 1, got {step}")
    if len(state) > cfg.max_new_tokens:
        raise ValueError(
            f"state has {len(state)} tokens, more than max_new_tokens={cfg.max_new_tokens}"
        )
    cut = cfg.index.sample(len(state), uniform(seed, chain, step, Purpose.INDEX))
    return StepPlan(
        step=step,
        cut=cut,
        prefix=state.tokens[:cut],
        max_tokens=cfg.max_new_tokens - cut,
        gen_seed=generator_seed(seed, chain, step),
        u_accept=uniform(seed, chain, step, Purpose.ACCEPT),
    )


def check_continuation(
    cfg: KernelConfig,
    plan: StepPlan,
    new_tokens: tuple[int, ...],
    finish: Finish,
    new_logprobs: tuple[float, ...] | None,
) -> RejectReason | None:
    """Why a continuation cannot be a proposal of this kernel, or None when it can."""
    if not new_tokens:
        return RejectReason.EMPTY_CONTINUATION
    if len(new_tokens) > plan.max_tokens:
        return RejectReason.OVER_BUDGET
    if finish is Finish.LENGTH and len(new_tokens) < plan.max_tokens:
        # The server stopped for a reason of its own (context limit): not the capped LM conditional.
        return RejectReason.EARLY_LENGTH_STOP
    if cfg.needs_logprobs and (new_logprobs is None or len(new_logprobs) != len(new_tokens)):
        return RejectReason.MISSING_LOGPROBS
    return None


def make_proposal(
    plan: StepPlan,
    current: State | None,
    new_tokens: tuple[int, ...],
    finish: Finish,
    reward: float,
    new_logprobs: tuple[float, ...] | None = None,
) -> State:
    """y' = y[:i] + new tokens, carrying per-token logprobs when both parts have them."""
    logprobs: tuple[float, ...] | None = None
    if new_logprobs is not None:
        if plan.cut == 0:
            logprobs = new_logprobs
        elif current is not None and current.logprobs is not None:
            logprobs = current.logprobs[: plan.cut] + new_logprobs
    return State(tokens=plan.prefix + new_tokens, reward=reward, finish=finish, logprobs=logprobs)


def log_acceptance(cfg: KernelConfig, plan: StepPlan, current: State, proposal: State) -> float:
    """Unclamped log of the Metropolis-Hastings ratio pi(y')q(y|y') / (pi(y)q(y'|y)).

    The suffix probabilities of the LM cancel for QAlign; QUEST keeps them; power sampling keeps
    them with weight alpha - 1 and has no reward term.
    """
    i = plan.cut
    log_a = cfg.index.log_prob(i, len(proposal)) - cfg.index.log_prob(i, len(current))
    if cfg.method is Method.POWER:
        assert cfg.alpha is not None  # KernelConfig refuses a power kernel without one
        new, old = proposal.suffix_logprob(i), current.suffix_logprob(i)
        return log_a + cfg.alpha * (new - old) + (old - new)
    log_a += (proposal.reward - current.reward) / cfg.beta
    if cfg.method is Method.QUEST:
        log_a += current.suffix_logprob(i) - proposal.suffix_logprob(i)
    return log_a


def decide(
    cfg: KernelConfig,
    plan: StepPlan,
    current: State,
    proposal: State | None,
    unusable: RejectReason | None = None,
) -> Decision:
    """Accept or reject `proposal` using the plan's uniform; total for every input."""
    if unusable is not None or proposal is None:
        return Decision(-math.inf, 0.0, False, unusable or RejectReason.EMPTY_CONTINUATION)
    if cfg.needs_reward and not proposal.reward_is_finite:
        return Decision(-math.inf, 0.0, False, RejectReason.NON_FINITE_REWARD)
    if cfg.index.log_prob(plan.cut, len(proposal)) == -math.inf:
        return Decision(-math.inf, 0.0, False, RejectReason.IRREVERSIBLE)
    if cfg.needs_reward and not current.reward_is_finite:
        # Only an initial state can carry a non-finite reward; any scored proposal replaces it.
        return Decision(math.inf, 1.0, True)
    if cfg.needs_logprobs and (current.logprobs is None or proposal.logprobs is None):
        return Decision(-math.inf, 0.0, False, RejectReason.MISSING_LOGPROBS)
    log_a = log_acceptance(cfg, plan, current, proposal)
    if math.isnan(log_a):
        why = (
            RejectReason.NON_FINITE_REWARD if cfg.needs_reward else RejectReason.NON_FINITE_LOGPROB
        )
        return Decision(-math.inf, 0.0, False, why)
    clamped = min(max(log_a, -cfg.clamp), cfg.clamp)
    alpha = 1.0 if clamped >= 0 else math.exp(clamped)
    return Decision(log_a, alpha, plan.u_accept < alpha)
