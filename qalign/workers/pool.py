"""The worker's task pool: Celery's thread pool with every thread started up front.

Celery's `threads` pool starts a thread the first time a task finds none idle, in the consumer
thread and one at a time (`Thread.start` waits for the new thread to run, which waits for the
GIL the busy event-loop thread holds). When a sweep starts, hundreds of step messages arrive
at once and each paid for its thread's start before the next was taken off the broker. Starting
them all before the worker reports ready takes that off the sweep's critical path.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from celery.concurrency.thread import TaskPool

# How long the start-up waits for all threads to exist; past it the pool starts the rest
# lazily, as Celery's does (never a reason not to start the worker).
_WARM_TIMEOUT_S = 30.0


class WarmThreadPool(TaskPool):  # type: ignore[misc]  # celery is untyped
    """Celery's thread pool, with its `limit` threads started when the pool starts."""

    def on_start(self) -> None:
        super().on_start()
        # `limit` jobs that each wait until all are running occupy `limit` distinct threads,
        # so the executor has to start every one of them.
        barrier = threading.Barrier(self.limit)

        def hold() -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(_WARM_TIMEOUT_S)

        jobs: list[Any] = [self.executor.submit(hold) for _ in range(self.limit)]
        for job in jobs:
            job.result()
