"""What taking one step did."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qalign.storage.repo import ChainRow


class Result(StrEnum):
    COMMITTED = "committed"  # this call took the step
    DUPLICATE = "duplicate"  # the step was already taken (redelivery, concurrent twin)
    SKIPPED = "skipped"  # chain finished, cancelled or missing, or the message is stale
    FAILED = "failed"  # the attempt failed; the failure is recorded on the chain
    DEFERRED = "deferred"  # the database was unavailable: nothing happened, try again later
    # `stop_when`: the step follows a checkpoint that another chain of the prompt has not
    # reached yet; the last chain to reach it hands this one on (nothing happened)
    WAITING = "waiting"
    CONVERGED = "converged"  # `stop_when`: the prompt's chains converged; the chain retired


@dataclass(frozen=True)
class Outcome:
    chain_id: int
    step: int
    result: Result
    next_step: int | None = None  # the chain's next step to take, when one follows
    chain_status: str | None = None
    attempts: int = 0  # failed attempts at this step so far
    error: str | None = None
    run_id: int | None = None
    # (chain, step) hints for other chains, handed on whatever this chain does next: chains
    # that waited at a `stop_when` checkpoint this step released
    wake: tuple[tuple[int, int], ...] = ()
    # COMMITTED: the chain as the commit left it (what a read would return), for the driver's
    # next step; not part of the outcome's identity
    row: ChainRow | None = field(default=None, compare=False, repr=False)
