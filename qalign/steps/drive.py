"""A chain driven through the step service and the after-step policy.

Both runners are this loop: `qalign run` drives each chain with no budget, a Celery task with
its per-task budget; whatever does not continue here (a retry, a hand-on) goes to the runner's
dispatcher through `follow`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

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
    on_wake: Callable[[Sequence[tuple[int, int]]], object] | None = None,
    ready_at: float | None = None,
    contended: Callable[[], bool] | None = None,
) -> tuple[Outcome, Next]:
    """Take steps of one chain from `step` until the policy says anything but continue.

    Other chains a step released (`Outcome.wake`) go to `on_wake` at once, so they do not
    wait for this chain's driver to stop; without it they come back in the returned `Next`.
    `ready_at` (`time.time()`) is when the first step became runnable (None: now); each next
    step is runnable as soon as the previous one has committed.

    `contended` tells whether other chains wait for a slot once the budget is spent (see
    `after_step`).

    Returns the last outcome and what follows it (a retry, a hand-on, or stop).
    """
    started = time.monotonic()
    taken = 0
    known = None  # the chain as this driver's last commit left it
    wake: list[tuple[int, int]] = []
    gauge = service.metrics.in_flight
    gauge.inc()
    try:
        while True:
            out = await service.take(chain_id, step, ready_at, known)
            known = out.row
            ready_at = time.time()
            taken += 1
            if out.wake and on_wake is not None:
                on_wake(out.wake)
            elif out.wake:
                wake += out.wake
            if on_outcome is not None:
                on_outcome(out)
            nxt = after_step(
                out,
                taken=taken,
                elapsed=time.monotonic() - started,
                budget=budget,
                stopping=stopping(),
                contended=contended,
            )
            if nxt.action is not Action.CONTINUE or nxt.step is None:
                return out, dataclasses.replace(nxt, wake=tuple(wake)) if wake else nxt
            step = nxt.step
    finally:
        gauge.dec()


def follow(dispatcher: Dispatcher, chain_id: int, nxt: Next) -> None:
    """Hand what follows a driver's last step to `dispatcher` (nothing when it stops), and the
    steps of the chains it released."""
    if nxt.wake:
        dispatcher.enqueue_many(nxt.wake)
    if nxt.action in (Action.RETRY, Action.HAND_ON) and nxt.step is not None:
        dispatcher.enqueue(chain_id, nxt.step, countdown=nxt.delay or None)
