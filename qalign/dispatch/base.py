"""The `Dispatcher` interface every scheduler and step driver is typed against."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

STEP_TASK = "qalign.step"


class Dispatcher(Protocol):
    """Hands "take step `step` of chain `chain_id`" hints to the step executors."""

    def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None:
        """Hand on one hint, to be acted on after `countdown` seconds (None: now)."""
        ...

    def enqueue_many(self, items: Iterable[tuple[int, int]]) -> int:
        """Hand on many (chain id, step) hints at once; returns how many."""
        ...
