"""The worker's task pool: Celery's thread pool with every thread started up front.

Celery's `threads` pool starts a thread the first time a task finds none idle, in the consumer
thread and one at a time (`Thread.start` waits for the new thread to run, which waits for the
GIL the busy event-loop thread holds). When a sweep starts, hundreds of step messages arrive
at once and each paid for its thread's start before the next was taken off the broker. Starting
them all before the worker reports ready takes that off the sweep's critical path.
"""

from __future__ import annotations

from celery.concurrency.thread import TaskPool

from qalign.steps.threads import start_threads


class WarmThreadPool(TaskPool):  # type: ignore[misc]  # celery is untyped
    """Celery's thread pool, with its `limit` threads started when the pool starts."""

    def on_start(self) -> None:
        super().on_start()
        start_threads(self.executor, self.limit)
