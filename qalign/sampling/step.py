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
from qalign.clients.errors import PromptTooLongError
from qalign.core import (
    Decision,
    Finish,
    KernelConfig,
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
    ids = await gen.chat_prompt(messages)
    if len(ids) > max_prompt_length:
        raise PromptTooLongError(
            f"the templated prompt is {len(ids)} tokens, over max_prompt_length="
            f"{max_prompt_length}; raise max_prompt_length or drop this prompt"
        )
    return ids


async def _sample(
    spec: ChainSpec, gen: Generator, plan: StepPlan
) -> tuple[tuple[int, ...], Finish, tuple[float, ...] | None, str, float]:
    cont = await gen.generate(
        spec.prompt_ids + plan.prefix,
        max_tokens=plan.max_tokens,
        seed=plan.gen_seed,
        params=spec.sampling,
        logprobs=spec.kernel.needs_logprobs or spec.track_logprobs,
        affinity=spec.key,
    )
    return cont.token_ids, cont.finish, cont.logprobs, cont.endpoint, cont.latency_s


@dataclass(frozen=True)
class _Scored:
    reward: float
    text: str
    latency_s: float
    tokens: int | None = None
    terms: dict[str, float] | None = None


async def _score(spec: ChainSpec, gen: Generator, rm: RewardModel, candidate: State) -> _Scored:
    text = await gen.detokenize(candidate.text_tokens)
    conv = [reward_conversation(spec.messages, text)]
    t0 = time.perf_counter()
    score_terms = getattr(rm, "score_terms", None)
    if score_terms is not None:  # a composite reward: keep each term
        (reward,), (terms,) = await score_terms(conv)
        return _Scored(float(reward), text, time.perf_counter() - t0, terms=dict(terms))
    (reward,), (n_tokens,) = await score_with_tokens(rm, conv)
    return _Scored(float(reward), text, time.perf_counter() - t0, n_tokens)


async def initial_step(spec: ChainSpec, gen: Generator, rm: RewardModel | None) -> StepRecord:
    """Step 0: draw the chain's first state from the LM and score it (unscored: reward NaN)."""
    plan = plan_initial(spec.kernel, spec.seed, spec.key)
    tokens, finish, logprobs, endpoint, gen_latency = await _sample(spec, gen, plan)
    state = make_proposal(plan, None, tokens, finish, math.nan, logprobs)
    if rm is None:
        scored = _Scored(math.nan, await gen.detokenize(state.text_tokens), 0.0)
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
        endpoint=endpoint,
        gen_latency_s=gen_latency,
        reward_latency_s=scored.latency_s,
        reward_tokens=scored.tokens,
        reward_terms=scored.terms,
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
    rm: RewardModel,
) -> StepRecord:
    """Propose from `current` at step `step` (>= 1), score, and accept or reject."""
    plan = plan_step(spec.kernel, current, spec.seed, spec.key, step)
    tokens, finish, logprobs, endpoint, gen_latency = await _sample(spec, gen, plan)
    unusable = check_continuation(spec.kernel, plan, tokens, finish, logprobs)
    proposal: State | None = None
    scored = _Scored(math.nan, "", 0.0)
    if unusable is None:
        unscored = make_proposal(plan, current, tokens, finish, math.nan, logprobs)
        scored = await _score(spec, gen, rm, unscored)
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
        endpoint=endpoint,
        gen_latency_s=gen_latency,
        reward_latency_s=scored.latency_s,
        reward_tokens=scored.tokens,
        reward_terms=scored.terms,
    )


def ancestral_spec(spec: ChainSpec, k: int) -> ChainSpec:
    """The spec of the k-th independent sample for a prompt: its own random stream."""
    return replace(spec, key=f"{spec.key}/ancestral/{k}")
