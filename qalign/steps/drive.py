"""A chain driven through the step service and the after-step policy.

Both runners are this loop: `qalign run` drives each chain with no budget, a Celery task with
its per-task budget; whatever does not continue here (a retry, a hand-on) goes to the runner's
dispatcher through `follow`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qalign.dispatch.base import Dispatcher
from qalign.steps.outcome import Outcome
from qalign.steps.policy import UNLIMITED, Action, Budget, Next, after_step
from qalign.steps.service import StepService


async def drive(
    service: StepService,
    chain_id: int,
    step: int,
    *,
    budget: Budget = UNLIMITED,
    stopping: Callable[[], bool] = lambda: False,
    on_outcome: Callable[[Outcome], None] | None = None,
    ready_at: float | None = None,
) -> tuple[Outcome, Next]:
    """Take steps of one chain from `step` until the policy says anything but continue.

    `ready_at` (`time.time()`) is when the first step became runnable (None: now); each next
    step is runnable as soon as the previous one has committed.

    Returns the last outcome and what follows it (a retry, a hand-on, or stop).
    """
    started = time.monotonic()
    taken = 0
    gauge = service.metrics.in_flight
    gauge.inc()
    try:
        while True:
            out = await service.take(chain_id, step, ready_at)
            ready_at = time.time()
            taken += 1
            if on_outcome is not None:
                on_outcome(out)
            nxt = after_step(
                out,
                taken=taken,
                elapsed=time.monotonic() - started,
                budget=budget,
                stopping=stopping(),
            )
            if nxt.action is not Action.CONTINUE or nxt.step is None:
                return out, nxt
            step = nxt.step
    finally:
        gauge.dec()


def follow(dispatcher: Dispatcher, chain_id: int, nxt: Next) -> None:
    """Hand what follows a driver's last step to `dispatcher` (nothing when it stops)."""
    if nxt.action in (Action.RETRY, Action.HAND_ON) and nxt.step is not None:
        dispatcher.enqueue(chain_id, nxt.step, countdown=nxt.delay or None)
