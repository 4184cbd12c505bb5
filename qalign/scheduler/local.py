"""The embedded runner of `qalign run`: the step service in this process, no broker.

Hints go through an in-process dispatcher; each chain is driven by the same `drive` loop and
after-step policy as a Celery task, with no per-task budget, so each chain advances on its own.
Interrupting and running again resumes from the last committed step of every chain.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from tqdm import tqdm

from qalign.dispatch.inprocess import InProcessDispatcher
from qalign.scheduler.sweeps import enqueue_unfinished
from qalign.steps.drive import drive, follow
from qalign.steps.outcome import Outcome, Result
from qalign.steps.policy import Action, after_step
from qalign.steps.service import StepService
from qalign.storage import repo
from qalign.storage.models import Chain, ChainStatus, Run


@dataclass
class LocalReport:
    """What one `run_locally` call did."""

    committed: int = 0
    duplicates: int = 0
    failures: int = 0
    failed_chains: list[int] = field(default_factory=list)
    results: Counter[str] = field(default_factory=Counter)

    def count(self, out: Outcome) -> None:
        self.results[out.result.value] += 1
        if out.result is Result.COMMITTED:
            self.committed += 1
        elif out.result is Result.FAILED:
            self.failures += 1
            if out.chain_status != ChainStatus.PENDING.value:
                self.failed_chains.append(out.chain_id)
        elif out.result is Result.DUPLICATE:
            self.duplicates += 1


def _progress_by_run(sessions: repo.Sessions, sweep_id: int) -> dict[int, tuple[str, int, int]]:
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


class _Bars:
    """One progress bar per run, advanced by committed steps."""

    def __init__(self, sessions: repo.Sessions, sweep_id: int, enabled: bool) -> None:
        self.bars: dict[int, Any] = {}
        if not enabled:
            return
        for pos, (run_id, (name, total, done)) in enumerate(
            sorted(_progress_by_run(sessions, sweep_id).items())
        ):
            self.bars[run_id] = tqdm(
                total=total, initial=done, desc=name[:60], position=pos, unit="step", leave=True
            )

    def update(self, out: Outcome) -> None:
        if out.result is Result.COMMITTED and out.run_id in self.bars:
            self.bars[out.run_id].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


async def run_locally(
    service: StepService,
    sweep_id: int,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    lockstep: bool = False,
) -> LocalReport:
    """Advance every unfinished chain of the sweep to its last step.

    With `lockstep`, every chain waits for the slowest one at each step, as the reference
    implementation does; it exists to measure what independent chains gain.

    Raises:
        DatabaseFailure: the database cannot be used any more; the run stops.
    """
    report = LocalReport()
    bars = _Bars(service.sessions, sweep_id, progress)

    def seen(out: Outcome) -> None:
        report.count(out)
        bars.update(out)

    async def handle(chain_id: int, step: int, ready_at: float) -> None:
        _, nxt = await drive(
            service,
            chain_id,
            step,
            on_outcome=seen,
            on_wake=dispatcher.enqueue_many,
            ready_at=ready_at,
        )
        follow(dispatcher, chain_id, nxt)

    dispatcher = InProcessDispatcher(handle)
    try:
        if lockstep:
            repo.reactivate_sweep(service.sessions, sweep_id)
            todo = repo.unfinished_chains(service.sessions, sweep_id, retry_failed)
            await _lockstep(service, dict(todo), seen)
        else:
            # On the loop: the dispatcher starts a task per hint. Blocking SQL here happens once.
            enqueue_unfinished(service.sessions, sweep_id, dispatcher, retry_failed=retry_failed)
            await dispatcher.join()
    finally:
        dispatcher.cancel()
        bars.close()
    return report


async def _lockstep(service: StepService, pending: dict[int, int], seen: Any) -> None:
    """Every chain takes step k before any takes step k + 1 (benchmark only)."""
    while pending:
        level = min(pending.values())
        batch = [cid for cid, step in pending.items() if step == level]
        ready_at = time.time()  # a level's steps are runnable once the previous level is done

        async def one(cid: int, level: int = level, ready_at: float = ready_at) -> None:
            out = await service.take(cid, level, ready_at)
            seen(out)
            for woken, at in out.wake:  # released from a `stop_when` checkpoint
                pending[woken] = at
            nxt = after_step(out)
            if nxt.action is Action.CONTINUE and nxt.step is not None:
                pending[cid] = nxt.step
            elif nxt.action is Action.RETRY:
                await asyncio.sleep(nxt.delay)  # retried at this level in the next round
            else:
                del pending[cid]

        await asyncio.gather(*(one(cid) for cid in batch))
