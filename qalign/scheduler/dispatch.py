"""Dispatchers hand (chain, step) hints to whatever executes steps. The database stays the
source of truth: a lost hint is recovered by `resume` or the reaper, a duplicate is harmless."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

STEP_TASK = "qalign.step"


class Dispatcher(Protocol):
    def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None: ...


class CeleryDispatcher:
    """Sends `qalign.step(chain_id, step)` through a Celery broker."""

    def __init__(self, app: Any = None) -> None:
        if app is None:
            from qalign.workers.app import app as default_app

            app = default_app
        self.app = app

    def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None:
        self.app.send_task(STEP_TASK, args=[chain_id, step], countdown=countdown)

    def enqueue_many(self, items: Iterable[tuple[int, int]]) -> int:
        n = 0
        with self.app.producer_or_acquire() as producer:
            for chain_id, step in items:
                self.app.send_task(STEP_TASK, args=[chain_id, step], producer=producer)
                n += 1
        return n
