"""What follows a step: one function for every runner.

`after_step` turns a step's outcome into the next action: take the chain's next step here
(continue, or adopt an orphaned chain), hand the chain on to the dispatcher (this driver's
budget is spent, or the worker is shutting down), retry the step later with backoff (a failed
attempt with attempts left, or a database that is unavailable), or stop (done, failed for good,
duplicate, skipped).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from qalign.steps.outcome import Outcome, Result
from qalign.storage.models import ChainStatus

RETRY_BASE_S = 1.0  # first retry of a failed step after 0.5-1 s, doubling per attempt
RETRY_CAP_S = 30.0
DEFERRED_S = (2.0, 8.0)  # database unavailable: spread the retries over this window


class Action(StrEnum):
    CONTINUE = "continue"  # take `step` now, in this driver
    HAND_ON = "hand_on"  # give `step` to the dispatcher now
    RETRY = "retry"  # give `step` to the dispatcher after `delay` seconds
    STOP = "stop"  # nothing follows


@dataclass(frozen=True)
class Next:
    action: Action
    step: int | None = None
    delay: float = 0.0
    wake: tuple[tuple[int, int], ...] = ()  # other chains' steps to hand on now (`Outcome.wake`)


@dataclass(frozen=True)
class Budget:
    """How much of a chain one driver takes before handing it on (None: no limit)."""

    steps: int | None = None
    seconds: float | None = None

    def spent(self, taken: int, elapsed: float) -> bool:
        return (self.steps is not None and taken >= self.steps) or (
            self.seconds is not None and elapsed >= self.seconds
        )


UNLIMITED = Budget()


def retry_delay(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before retrying a step that failed `attempts` times (jittered exponential).

    The clients already retried each request with backoff; this spreads the step retries of
    many chains that failed together.
    """
    u = (rng or random).uniform(0.5, 1.0)
    return min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** (max(attempts, 1) - 1)) * u


def after_step(
    out: Outcome,
    *,
    taken: int = 1,
    elapsed: float = 0.0,
    budget: Budget | None = None,
    stopping: bool = False,
    rng: random.Random | None = None,
    contended: Callable[[], bool] | None = None,
) -> Next:
    """The action that follows `out`.

    Args:
        taken: steps this driver has taken of the chain so far, this one included.
        elapsed: seconds this driver has spent on the chain.
        budget: when the driver hands the chain on instead of continuing.
        stopping: the process is shutting down: hand on rather than continue.
        contended: asked once the budget is spent: whether other chains wait for a slot. If
            not, the driver keeps its chain past the budget (handing it on would only put it
            back in the same empty queue); None: always hand on at the budget.
    """
    if out.result is Result.DEFERRED:
        return Next(Action.RETRY, out.step, (rng or random).uniform(*DEFERRED_S))
    if out.result is Result.FAILED:
        if out.chain_status == ChainStatus.PENDING.value:
            return Next(Action.RETRY, out.step, retry_delay(out.attempts, rng))
        return Next(Action.STOP)
    if out.next_step is None:
        return Next(Action.STOP)
    if stopping or (
        budget is not None and budget.spent(taken, elapsed) and (contended is None or contended())
    ):
        return Next(Action.HAND_ON, out.next_step)
    return Next(Action.CONTINUE, out.next_step)
