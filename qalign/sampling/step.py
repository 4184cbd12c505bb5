"""The step function: every entry point (seed API, `qalign run`, Celery workers) calls this.

A step is deterministic given (run seed, chain key, step) and the servers' seeded sampling, so
running it again after a crash proposes the same cut, asks for the same sample and makes the same
decision. Persisting the result idempotently is the caller's job.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from qalign.clients.base import (
    Conversation,
    Generator,
    RewardModel,
    SamplingParams,
    score_with_tokens,
)
from qalign.clients.cache import score_meter
from qalign.clients.errors import PromptTooLongError
from qalign.core import (
    Decision,
    Finish,
    KernelConfig,
    Method,
    State,
    StepPlan,
    check_continuation,
    decide,
    make_proposal,
    plan_initial,
    plan_step,
)


@dataclass(frozen=True)
class ChainSpec:
    """What a chain needs to take a step: its prompt, its kernel and its random coordinates."""

    key: str
    seed: int
    prompt_ids: tuple[int, ...]
    messages: Conversation
    kernel: KernelConfig
    sampling: SamplingParams = field(default_factory=SamplingParams)
    track_logprobs: bool = False  # ask for per-token log-probs even when the kernel needs none

    def __post_init__(self) -> None:
        if self.kernel.method is Method.POWER and self.sampling.temperature != 1.0:
            # The ratio needs log p per token; a tempered proposal would need p_T's too.
            raise ValueError(
                f"power sampling proposes at temperature 1 (got {self.sampling.temperature:g}): "
                "sharpen with alpha instead (see qalign.core.kernel)"
            )


@dataclass(frozen=True)
class StepRecord:
    """Everything one step did: the proposal, the decision and the chain's state afterwards.

    Step 0 is the initial (ancestral) sample; it is always "accepted" with alpha = 1.
    """

    step: int
    cut: int
    gen_seed: int
    new_tokens: tuple[int, ...]
    finish: Finish
    proposal: State | None
    proposal_text: str
    decision: Decision
    state: State
    state_text: str
    endpoint: str
    gen_latency_s: float
    reward_latency_s: float
    reward_tokens: int | None = None
    reward_terms: dict[str, float] | None = None  # a composite reward's raw terms, by name
    # Wall-clock cost at the servers, retries included: the generator's requests (sampling and
    # detokenizing) and the reward scoring (0 when the process's reward cache answered).
    generator_s: float = 0.0
    reward_s: float = 0.0
    log_weight: float | None = None  # SMC: the particle's log weight after this block

    @property
    def accepted(self) -> bool:
        return self.decision.accepted

    @property
    def reward(self) -> float:
        return self.proposal.reward if self.proposal is not None else math.nan


def reward_conversation(messages: Conversation, text: str) -> Conversation:
    """The conversation the reward model scores: the prompt messages plus the assistant reply."""
    return [*messages, {"role": "assistant", "content": text}]


async def templated_prompt(
    gen: Generator, messages: Conversation, max_prompt_length: int
) -> list[int]:
    """The generator's chat-templated token ids of `messages`, refusing prompts over the limit.

    Raises:
        PromptTooLongError: the templated prompt is longer than `max_prompt_length` (a prompt is
            never cut: that would change the question).
    """
    return check_prompt_length(await gen.chat_prompt(messages), max_prompt_length)


def check_prompt_length(ids: list[int], max_prompt_length: int) -> list[int]:
    """`ids` if the templated prompt fits `max_prompt_length`, else PromptTooLongError."""
    if len(ids) > max_prompt_length:
        raise PromptTooLongError(
            f"the templated prompt is {len(ids)} tokens, over max_prompt_length="
            f"{max_prompt_length}; raise max_prompt_length or drop this prompt"
        )
    return ids


@dataclass(frozen=True)
class _Sampled:
    tokens: tuple[int, ...]
    finish: Finish
    logprobs: tuple[float, ...] | None
    endpoint: str
    latency_s: float  # the answering request's own latency (the client's figure)
    wall_s: float  # the whole call, retries included


async def _sample(spec: ChainSpec, gen: Generator, plan: StepPlan) -> _Sampled:
    t0 = time.perf_counter()
    cont = await gen.generate(
        spec.prompt_ids + plan.prefix,
        max_tokens=plan.max_tokens,
        seed=plan.gen_seed,
        params=spec.sampling,
        logprobs=spec.kernel.needs_logprobs or spec.track_logprobs,
        affinity=spec.key,
    )
    wall = time.perf_counter() - t0
    return _Sampled(cont.token_ids, cont.finish, cont.logprobs, cont.endpoint, cont.latency_s, wall)


@dataclass(frozen=True)
class _Scored:
    reward: float
    text: str
    latency_s: float
    tokens: int | None = None
    terms: dict[str, float] | None = None
    detokenize_s: float = 0.0  # the generator's share of scoring: turning tokens into text
    server_s: float = 0.0  # `latency_s`, except 0 when the reward cache answered


async def _detokenize(gen: Generator, tokens: tuple[int, ...]) -> tuple[str, float]:
    t0 = time.perf_counter()
    text = await gen.detokenize(tokens)
    return text, time.perf_counter() - t0


async def _score(
    spec: ChainSpec, gen: Generator, rm: RewardModel, candidate: State, text: str | None = None
) -> _Scored:
    """Reward of `candidate`; `text`, when given, is its known text (no detokenize request)."""
    detok_s = 0.0
    if text is None:
        text, detok_s = await _detokenize(gen, candidate.text_tokens)
    conv = [reward_conversation(spec.messages, text)]
    t0 = time.perf_counter()
    terms: dict[str, float] | None = None
    n_tokens: int | None = None
    with score_meter() as meter:
        score_terms = getattr(rm, "score_terms", None)
        if score_terms is not None:  # a composite reward: keep each term
            (reward,), (raw,) = await score_terms(conv)
            terms = dict(raw)
        else:
            (reward,), (n_tokens,) = await score_with_tokens(rm, conv)
    elapsed = time.perf_counter() - t0
    return _Scored(
        float(reward),
        text,
        elapsed,
        n_tokens,
        terms,
        detokenize_s=detok_s,
        server_s=0.0 if meter.free else elapsed,
    )


async def initial_step(spec: ChainSpec, gen: Generator, rm: RewardModel | None) -> StepRecord:
    """Step 0: draw the chain's first state from the LM and score it (unscored: reward NaN).

    A kernel without a reward (power sampling) never scores, even when given a reward model.
    """
    plan = plan_initial(spec.kernel, spec.seed, spec.key)
    sampled = await _sample(spec, gen, plan)
    tokens, finish, logprobs = sampled.tokens, sampled.finish, sampled.logprobs
    state = make_proposal(plan, None, tokens, finish, math.nan, logprobs)
    if rm is None or not spec.kernel.needs_reward:
        text, detok_s = await _detokenize(gen, state.text_tokens)
        scored = _Scored(math.nan, text, 0.0, detokenize_s=detok_s)
    else:
        scored = await _score(spec, gen, rm, state)
        state = make_proposal(plan, None, tokens, finish, scored.reward, logprobs)
    text = scored.text
    return StepRecord(
        step=0,
        cut=0,
        gen_seed=plan.gen_seed,
        new_tokens=tokens,
        finish=finish,
        proposal=state,
        proposal_text=text,
        decision=Decision(0.0, 1.0, True),
        state=state,
        state_text=text,
        endpoint=sampled.endpoint,
        gen_latency_s=sampled.latency_s,
        reward_latency_s=scored.latency_s,
        reward_tokens=scored.tokens,
        reward_terms=scored.terms,
        generator_s=sampled.wall_s + scored.detokenize_s,
        reward_s=scored.server_s,
    )


WARM_START_ENDPOINT = "warm-start"  # the `endpoint` of a warm-started chain's step 0
WARM_START_SEED = -1  # its `gen_seed`: no generator was asked


def warm_start_step(state: State, text: str) -> StepRecord:
    """Step 0 of a warm-started chain: `state` (another chain's final state, with its reward)
    is taken as the initial state, always accepted, without asking any server."""
    return StepRecord(
        step=0,
        cut=0,
        gen_seed=WARM_START_SEED,
        new_tokens=state.tokens,
        finish=state.finish,
        proposal=state,
        proposal_text=text,
        decision=Decision(0.0, 1.0, True),
        state=state,
        state_text=text,
        endpoint=WARM_START_ENDPOINT,
        gen_latency_s=0.0,
        reward_latency_s=0.0,
        reward_tokens=None,
    )


async def mcmc_step(
    spec: ChainSpec,
    current: State,
    current_text: str,
    step: int,
    gen: Generator,
    rm: RewardModel | None,
) -> StepRecord:
    """Propose from `current` at step `step` (>= 1), score, and accept or reject.

    `rm` may be None only for a kernel without a reward (power sampling), which never scores.
    """
    if rm is None and spec.kernel.needs_reward:
        raise ValueError(f"method {spec.kernel.method.value!r} needs a reward model to step")
    plan = plan_step(spec.kernel, current, spec.seed, spec.key, step)
    sampled = await _sample(spec, gen, plan)
    tokens, finish, logprobs = sampled.tokens, sampled.finish, sampled.logprobs
    unusable = check_continuation(spec.kernel, plan, tokens, finish, logprobs)
    proposal: State | None = None
    scored = _Scored(math.nan, "", 0.0)
    if unusable is None:
        unscored = make_proposal(plan, current, tokens, finish, math.nan, logprobs)
        # A proposal that regenerated the current response (common when the cut is near the
        # end) has the current text: text is a function of the token ids.
        same = unscored.tokens == current.tokens and unscored.finish is current.finish
        known = current_text if same else None
        if rm is None or not spec.kernel.needs_reward:
            if known is None:
                text, detok_s = await _detokenize(gen, unscored.text_tokens)
            else:
                text, detok_s = known, 0.0
            scored = _Scored(math.nan, text, 0.0, detokenize_s=detok_s)
            proposal = unscored
        else:
            scored = await _score(spec, gen, rm, unscored, known)
            proposal = make_proposal(plan, current, tokens, finish, scored.reward, logprobs)
    text = scored.text
    decision = decide(spec.kernel, plan, current, proposal, unusable)
    accepted = decision.accepted and proposal is not None
    return StepRecord(
        step=step,
        cut=plan.cut,
        gen_seed=plan.gen_seed,
        new_tokens=tokens,
        finish=finish,
        proposal=proposal,
        proposal_text=text,
        decision=decision,
        state=proposal if accepted and proposal is not None else current,
        state_text=text if accepted else current_text,
        endpoint=sampled.endpoint,
        gen_latency_s=sampled.latency_s,
        reward_latency_s=scored.latency_s,
        reward_tokens=scored.tokens,
        reward_terms=scored.terms,
        generator_s=sampled.wall_s + scored.detokenize_s,
        reward_s=scored.server_s,
    )


def ancestral_spec(spec: ChainSpec, k: int) -> ChainSpec:
    """The spec of the k-th independent sample for a prompt: its own random stream."""
    return replace(spec, key=f"{spec.key}/ancestral/{k}")
