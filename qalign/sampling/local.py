"""Run many chains in one process: each chain advances on its own, no step barrier."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from qalign.clients.base import Generator, RewardModel
from qalign.sampling.step import ChainSpec, StepRecord, initial_step, mcmc_step

OnRecord = Callable[[ChainSpec, StepRecord], None]


async def run_chain(
    spec: ChainSpec,
    steps: int,
    gen: Generator,
    rm: RewardModel | None,
    *,
    limiter: asyncio.Semaphore | None = None,
    on_record: OnRecord | None = None,
    history: Sequence[StepRecord] = (),
) -> list[StepRecord]:
    """Advance one chain to `steps` MCMC steps, continuing after `history` when given."""
    limiter = limiter or asyncio.Semaphore(1)
    records = list(history)
    if not records:
        async with limiter:
            first = await initial_step(spec, gen, rm)
        records.append(first)
        if on_record:
            on_record(spec, first)
    while records[-1].step < steps:
        last = records[-1]
        async with limiter:
            rec = await mcmc_step(spec, last.state, last.state_text, last.step + 1, gen, rm)
        records.append(rec)
        if on_record:
            on_record(spec, rec)
    return records


async def run_chains(
    specs: Sequence[ChainSpec],
    steps: int,
    gen: Generator,
    rm: RewardModel | None,
    *,
    concurrency: int = 256,
    on_record: OnRecord | None = None,
) -> list[list[StepRecord]]:
    """Run every chain concurrently, at most `concurrency` steps in flight at any time."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    limiter = asyncio.Semaphore(concurrency)
    return list(
        await asyncio.gather(
            *(run_chain(s, steps, gen, rm, limiter=limiter, on_record=on_record) for s in specs)
        )
    )
