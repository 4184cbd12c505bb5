"""The embedded default: execute a stored sweep in this process, no broker.

The same `advance` as the Celery task, with bounded concurrency; each chain advances on its own.
Interrupting and running again resumes from the last committed step of every chain.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from tqdm import tqdm

from qalign.storage import repo
from qalign.storage.models import Chain, ChainStatus, Run
from qalign.workers.execute import Outcome, Result, Services, advance


@dataclass
class LocalReport:
    """What one `run_locally` call did."""

    committed: int = 0
    duplicates: int = 0
    failures: int = 0
    failed_chains: list[int] = field(default_factory=list)
    results: Counter[str] = field(default_factory=Counter)


def _chains_by_run(sessions: repo.Sessions, sweep_id: int) -> dict[int, tuple[str, int, int]]:
    """run id -> (name, steps total, steps done)."""
    with sessions() as s:
        rows = s.execute(
            select(Run.id, Run.name, Chain.target_steps, Chain.current_step)
            .join(Chain, Chain.run_id == Run.id)
            .where(Run.sweep_id == sweep_id)
        ).all()
    out: dict[int, tuple[str, int, int]] = {}
    for run_id, name, target, cur in rows:
        n, total, done = out.get(run_id, (name, 0, 0))
        out[run_id] = (n, total + target + 1, done + cur + 1)
    return out


def _run_of(sessions: repo.Sessions, chain_ids: list[int]) -> dict[int, int]:
    with sessions() as s:
        rows = s.execute(select(Chain.id, Chain.run_id).where(Chain.id.in_(chain_ids))).all()
    return {cid: rid for cid, rid in rows}


async def run_locally(
    services: Services,
    sweep_id: int,
    *,
    concurrency: int = 64,
    max_attempts: int = 5,
    retry_failed: bool = False,
    progress: bool = True,
    backoff: float = 1.0,
    lockstep: bool = False,
) -> LocalReport:
    """Advance every unfinished chain of the sweep to its last step.

    With `lockstep`, every chain waits for the slowest one at each step, as the reference
    implementation does; it exists to measure what independent chains gain.
    """
    sessions = services.sessions
    await services.db(repo.reactivate_sweep, sessions, sweep_id)
    todo = await services.db(repo.unfinished_chains, sessions, sweep_id, retry_failed)
    report = LocalReport()
    bars: dict[int, Any] = {}
    if progress and todo:
        runs = await services.db(_chains_by_run, sessions, sweep_id)
        for pos, (run_id, (name, total, done)) in enumerate(sorted(runs.items())):
            bars[run_id] = tqdm(
                total=total, initial=done, desc=name[:60], position=pos, unit="step", leave=True
            )
    run_of = await services.db(_run_of, sessions, [cid for cid, _ in todo]) if bars else {}
    limiter = asyncio.Semaphore(concurrency)

    async def take(chain_id: int, step: int) -> Outcome:
        """One step under the concurrency limit, counted in the report and the progress bar."""
        async with limiter:
            out = await advance(services, chain_id, step, max_attempts=max_attempts)
        report.results[out.result.value] += 1
        if out.result is Result.COMMITTED:
            report.committed += 1
            if chain_id in run_of:
                bars[run_of[chain_id]].update(1)
        elif out.result is Result.FAILED:
            report.failures += 1
            if out.chain_status != ChainStatus.PENDING.value:
                report.failed_chains.append(chain_id)
        elif out.result is Result.DUPLICATE:
            report.duplicates += 1
        return out

    def retried(out: Outcome) -> bool:
        """A failed step whose chain still has attempts left."""
        return out.result is Result.FAILED and out.chain_status == ChainStatus.PENDING.value

    async def drive(chain_id: int, step: int) -> None:
        tries = 0
        next_step: int | None = step
        while next_step is not None:
            out = await take(chain_id, next_step)
            if out.result is Result.COMMITTED:
                tries = 0
                next_step = out.next_step
            elif retried(out):
                tries += 1
                await asyncio.sleep(backoff * (2 ** min(tries, 6)) * random.uniform(0.5, 1.0))
            else:
                return

    async def lockstep_all() -> None:
        pending = dict(todo)
        while pending:
            level = min(pending.values())
            batch = [cid for cid, step in pending.items() if step == level]

            async def one(cid: int, level: int = level) -> None:
                out = await take(cid, level)
                if out.result is Result.COMMITTED and out.next_step is not None:
                    pending[cid] = out.next_step
                elif not retried(out):  # a retried step runs at this level in the next round
                    del pending[cid]

            await asyncio.gather(*(one(cid) for cid in batch))

    try:
        if lockstep:
            await lockstep_all()
        else:
            await asyncio.gather(*(drive(cid, step) for cid, step in todo))
    finally:
        for bar in bars.values():
            bar.close()
    return report
