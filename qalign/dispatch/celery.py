"""The Celery side of dispatch: the app's broker settings, and a dispatcher that publishes hints.

`celery_app` configures an app without registering any task, so schedulers can publish
`qalign.step` messages without importing the worker code; `qalign.workers.app` adds the task.
Delivery is at-least-once (late acks, redelivery when a worker dies); a step's effect is
exactly-once because the step service commits with a compare-and-set in SQL. Only JSON is
accepted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from qalign.dispatch.base import STEP_TASK

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "qalign"
# A message header: when its step becomes runnable (`time.time()` at publishing, plus the
# countdown), so a worker can store how long the step waited (`proposals.queue_seconds`).
READY_AT_HEADER = "qalign_ready_at"


@dataclass(frozen=True)
class BrokerSettings:
    """Where hints go: the broker URL and the queue name."""

    url: str = DEFAULT_BROKER
    queue: str = DEFAULT_QUEUE
    task_time_limit: int = 3600
    task_soft_time_limit: int = 3300


def celery_app(settings: BrokerSettings) -> Celery:
    """A Celery app for `settings`, with qalign's delivery guarantees and no tasks."""
    app = Celery("qalign", broker=settings.url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.task_soft_time_limit,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=settings.queue,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Keep publishing through a broker restart (~40 s of retries) so the next-step hint of a
        # committed step survives it; past that the reaper re-enqueues the chain.
        task_publish_retry_policy={
            "max_retries": 25,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
    )
    return app


class CeleryDispatcher:
    """Publishes `qalign.step(chain_id, step)` messages through `app`'s broker."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None:
        self.app.send_task(
            STEP_TASK,
            args=[chain_id, step],
            countdown=countdown or None,
            headers={READY_AT_HEADER: time.time() + (countdown or 0.0)},
        )

    def enqueue_many(self, items: Iterable[tuple[int, int]]) -> int:
        n = 0
        with self.app.producer_or_acquire() as producer:
            for chain_id, step in items:
                self.app.send_task(
                    STEP_TASK,
                    args=[chain_id, step],
                    producer=producer,
                    headers={READY_AT_HEADER: time.time()},
                )
                n += 1
        return n
