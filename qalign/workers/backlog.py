"""Whether chains wait for a worker slot: what decides if a task keeps its chain past its budget.

A task hands its chain on after `--steps-per-task` steps so that chains waiting in the queue get
a turn. When none wait, handing on only puts the chain back into an empty queue: a broker round
trip, and at the end of a sweep a chain that waits for a free thread behind other chains'
budgets while the servers idle. So the budget applies only while something waits: a message
this worker reserved but has not started, or any message in the broker's queue.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class Backlog:
    """`backlog()`: whether chains wait for a slot, asked of the broker at most every `every` s.

    Args:
        app: the worker's Celery app (its connection pool reaches the broker).
        queue: the queue its tasks come from.
        every: seconds an answer from the broker is reused (tasks ask after every step past
            their budget; the queue need not be read that often).
    """

    def __init__(self, app: Any, queue: str, every: float = 1.0) -> None:
        self.app = app
        self.queue = queue
        self.every = every
        self._lock = threading.Lock()
        self._until = 0.0
        self._queued = True

    def __call__(self) -> bool:
        return self.reserved_waiting() or self.queued()

    @staticmethod
    def reserved_waiting() -> bool:
        """Messages this worker reserved (prefetched) that no thread has started yet."""
        from celery.worker import state

        return len(state.reserved_requests) > len(state.active_requests)

    def queued(self) -> bool:
        """Whether the broker's queue holds messages (the last answer within `every` s)."""
        with self._lock:
            if time.monotonic() < self._until:
                return self._queued
        from amqp.exceptions import ChannelError  # type: ignore[import-untyped]

        try:
            with self.app.connection_or_acquire() as conn:
                ok = conn.default_channel.queue_declare(queue=self.queue, passive=True)
            queued = int(ok.message_count) > 0
        except ChannelError:  # no such queue (kombu's Redis says so with code 0): none queued
            queued = False
        except Exception as exc:  # unknown: hand on at the budget, as without this check
            log.debug("cannot read the length of queue %s: %s", self.queue, exc)
            queued = True
        with self._lock:
            self._queued, self._until = queued, time.monotonic() + self.every
        return queued
