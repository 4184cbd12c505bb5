"""The dispatcher of `qalign run`: hints become tasks on this process's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

Handler = Callable[[int, int, float], Coroutine[Any, Any, None]]


class InProcessDispatcher:
    """Runs `handler(chain_id, step, ready_at)` as an asyncio task for every hint, `ready_at`
    being when the hint became runnable (`time.time()`: enqueued, or its countdown ran out).

    Every method must be called on the event loop that runs the handlers. `join()` returns
    when no hint is pending or running any more, and raises the first error a handler raised
    (after cancelling the others): an error that reaches here is not one chain's business
    (e.g. the database became read-only), so the run stops.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._changed = asyncio.Event()
        self._error: BaseException | None = None

    def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None:
        if countdown:
            loop = asyncio.get_running_loop()
            timer: asyncio.TimerHandle | None = None

            def fire() -> None:
                assert timer is not None
                self._timers.discard(timer)
                self._start(chain_id, step)

            timer = loop.call_later(countdown, fire)
            self._timers.add(timer)
        else:
            self._start(chain_id, step)

    def enqueue_many(self, items: Iterable[tuple[int, int]]) -> int:
        n = 0
        for chain_id, step in items:
            self._start(chain_id, step)
            n += 1
        return n

    @property
    def pending(self) -> int:
        """Hints running or waiting for their countdown."""
        return len(self._tasks) + len(self._timers)

    def _start(self, chain_id: int, step: int) -> None:
        task = asyncio.get_running_loop().create_task(self._handler(chain_id, step, time.time()))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()
        self._changed.set()

    async def join(self) -> None:
        """Wait until every hint (including those enqueued meanwhile) has been handled."""
        try:
            while self.pending and self._error is None:
                self._changed.clear()
                await self._changed.wait()
        finally:
            if self._error is not None or self.pending:
                self.cancel()
                # Let the cancelled handlers unwind before the caller closes what they use
                # (clients, database), so none of them fails on a closed resource.
                await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Drop every pending hint and cancel the running handlers."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
