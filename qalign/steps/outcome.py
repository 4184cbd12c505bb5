"""What taking one step did."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Result(StrEnum):
    COMMITTED = "committed"  # this call took the step
    DUPLICATE = "duplicate"  # the step was already taken (redelivery, concurrent twin)
    SKIPPED = "skipped"  # chain finished, cancelled or missing, or the message is stale
    FAILED = "failed"  # the attempt failed; the failure is recorded on the chain
    DEFERRED = "deferred"  # the database was unavailable: nothing happened, try again later


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
