"""Independent LM samples per conversation: the best-of-n and voting baselines of the seed API."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from typing import Any, Protocol

from tqdm import tqdm

from qalign.clients.base import Conversation, Generator, RewardModel, SamplingParams
from qalign.core import KernelConfig, Method
from qalign.sampling.loop import run_sync
from qalign.sampling.step import ChainSpec, StepRecord, ancestral_spec, initial_step


class PromptSource(Protocol):
    """What sampling needs of a seed-style generator wrapper (`qalign.model.RemoteVLLM`)."""

    generator: Generator
    sampling: SamplingParams
    max_new_tokens: int
    max_concurrent_requests: int

    async def prompt_ids(self, conversation: Conversation) -> list[int]: ...


def progress(total: int, enabled: bool, desc: str) -> tqdm[Any] | None:
    """A step progress bar when `enabled`."""
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True) if enabled else None


async def chain_specs(
    model: PromptSource,
    conversations: Sequence[Conversation],
    kernel: KernelConfig,
    seed: int,
    *,
    track_logprobs: bool = False,
) -> list[ChainSpec]:
    """One chain spec per conversation, keyed by its position."""
    prompts = await asyncio.gather(*(model.prompt_ids(c) for c in conversations))
    return [
        ChainSpec(
            key=str(i),
            seed=seed,
            prompt_ids=tuple(p),
            messages=list(c),
            kernel=kernel,
            sampling=model.sampling,
            track_logprobs=track_logprobs,
        )
        for i, (c, p) in enumerate(zip(conversations, prompts, strict=True))
    ]


def ancestral_records(
    model: PromptSource,
    rm: RewardModel | None,
    conversations: Sequence[Conversation],
    n: int,
    *,
    seed: int | None,
    use_tqdm: bool = False,
    logprobs: bool = False,
) -> list[list[StepRecord]]:
    """n independent LM samples per conversation, scored when `rm` is given.

    With `logprobs`, each sample carries its per-token log-probs (QUEST's kernel asks for them;
    its initial sample is the same ancestral draw as QAlign's).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    run_seed = secrets.randbits(31) if seed is None else seed
    method = Method.QUEST if logprobs else Method.QALIGN
    kernel = KernelConfig(beta=1.0, max_new_tokens=model.max_new_tokens, method=method)
    bar = progress(len(conversations) * n, use_tqdm, "ancestral")

    async def _run() -> list[list[StepRecord]]:
        specs = await chain_specs(model, conversations, kernel, run_seed)
        limiter = asyncio.Semaphore(model.max_concurrent_requests)

        async def one(spec: ChainSpec, k: int) -> StepRecord:
            async with limiter:
                rec = await initial_step(ancestral_spec(spec, k), model.generator, rm)
            if bar is not None:
                bar.update(1)
            return rec

        return [list(await asyncio.gather(*(one(s, k) for k in range(n)))) for s in specs]

    try:
        return run_sync(_run())
    finally:
        if bar is not None:
            bar.close()
