"""One SMC block of one particle: extend its state by up to `block_tokens` tokens and reweight.

Like `mcmc_step`, a block is deterministic given (run seed, particle key, block) and the
servers' seeded sampling, and the caller persists it idempotently. The particle's start (its
own or its resampled parent's state after the previous block, and its log weight) comes from
the resampling barrier (`qalign.steps.smc`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from qalign.clients.base import Generator, RewardModel
from qalign.core import Decision, Finish, State, generator_seed
from qalign.core.smc import increment, is_complete
from qalign.sampling.step import ChainSpec, StepRecord, _score

FINISHED_ENDPOINT = "finished"  # the `endpoint` of a block a finished particle skipped


class UnusableBlockError(ValueError):
    """The generator's answer cannot extend a particle (empty, or cut short for its own reasons)."""


@dataclass(frozen=True)
class Start:
    """A particle as it starts a block: its state after the previous block and its log weight."""

    state: State
    text: str
    log_weight: float


async def smc_block(
    spec: ChainSpec,
    start: Start | None,
    step: int,
    block_tokens: int,
    gen: Generator,
    rm: RewardModel,
) -> StepRecord:
    """Block `step` of a particle from `start` (None for block 0: the empty response)."""
    cfg = spec.kernel
    prefix = start.state.tokens if start is not None else ()
    seed = generator_seed(spec.seed, spec.key, step)
    accepted = Decision(0.0, 1.0, True)
    if start is not None and is_complete(start.state, cfg.max_new_tokens):
        # A finished particle keeps its response and weight; its remaining blocks are no-ops.
        return StepRecord(
            step=step, cut=len(prefix), gen_seed=seed, new_tokens=(), finish=start.state.finish,
            proposal=start.state, proposal_text=start.text, decision=accepted, state=start.state,
            state_text=start.text, endpoint=FINISHED_ENDPOINT, gen_latency_s=0.0,
            reward_latency_s=0.0, log_weight=start.log_weight,
        )  # fmt: skip
    budget = min(block_tokens, cfg.max_new_tokens - len(prefix))
    t0 = time.perf_counter()
    cont = await gen.generate(
        spec.prompt_ids + prefix,
        max_tokens=budget,
        seed=seed,
        params=spec.sampling,
        affinity=spec.key,
    )
    wall = time.perf_counter() - t0
    if not cont.token_ids or len(cont.token_ids) > budget:
        raise UnusableBlockError(f"the generator returned {len(cont.token_ids)} tokens for a "
                                 f"block of at most {budget}")  # fmt: skip
    if cont.finish is Finish.LENGTH and len(cont.token_ids) < budget:
        raise UnusableBlockError("the generator stopped early for a reason of its own")
    unscored = State(prefix + cont.token_ids, math.nan, cont.finish)
    scored = await _score(spec, gen, rm, unscored)
    state = State(unscored.tokens, scored.reward, cont.finish)
    before = start.log_weight if start is not None else 0.0
    previous = start.state.reward if start is not None else 0.0
    log_weight = before + increment(cfg.beta, scored.reward, previous)
    return StepRecord(
        step=step,
        cut=len(prefix),
        gen_seed=seed,
        new_tokens=cont.token_ids,
        finish=cont.finish,
        proposal=state,
        proposal_text=scored.text,
        decision=accepted,
        state=state,
        state_text=scored.text,
        endpoint=cont.endpoint,
        gen_latency_s=cont.latency_s,
        reward_latency_s=scored.latency_s,
        reward_tokens=scored.tokens,
        reward_terms=scored.terms,
        generator_s=wall + scored.detokenize_s,
        reward_s=scored.server_s,
        log_weight=log_weight,
    )
