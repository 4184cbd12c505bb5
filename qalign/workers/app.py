"""The Celery app and the step task.

Delivery is at-least-once (late acks, redelivery when a worker dies); the effect of a step is
exactly-once because `advance` commits with a compare-and-set in SQL. Only JSON is accepted.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from typing import Any

from celery import Celery

from qalign.scheduler.dispatch import STEP_TASK

log = logging.getLogger(__name__)

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def broker_url(explicit: str | None = None) -> str:
    """Explicit URL > `QALIGN_BROKER_URL` > local Redis."""
    return explicit or os.environ.get("QALIGN_BROKER_URL") or DEFAULT_BROKER


def make_app(broker: str | None = None) -> Celery:
    celery = Celery("qalign", broker=broker_url(broker))
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=int(os.environ.get("QALIGN_TASK_TIME_LIMIT", "3600")),
        task_soft_time_limit=int(os.environ.get("QALIGN_TASK_SOFT_TIME_LIMIT", "3300")),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=os.environ.get("QALIGN_QUEUE", "qalign"),
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return celery


app = make_app()

_services_lock = threading.Lock()
_services: Any = None


def services() -> Any:
    """This worker process's database sessions and server clients (created on first use)."""
    global _services
    with _services_lock:
        if _services is None:
            from qalign.storage.engine import database_url, make_engine, make_sessionmaker
            from qalign.workers.execute import Services

            engine = make_engine(database_url())
            _services = Services(sessions=make_sessionmaker(engine))
        return _services


def max_attempts() -> int:
    return int(os.environ.get("QALIGN_MAX_ATTEMPTS", "5"))


@app.task(name=STEP_TASK, bind=True, ignore_result=True)
def step_task(self: Any, chain_id: int, step: int) -> str:
    """Take step `step` of chain `chain_id`, then enqueue the chain's next step."""
    from qalign.sampling.loop import run_sync
    from qalign.workers.execute import Result, advance

    out = run_sync(advance(services(), int(chain_id), int(step), max_attempts=max_attempts()))
    if out.result is Result.COMMITTED and out.next_step is not None:
        self.app.send_task(STEP_TASK, args=[chain_id, out.next_step])
    elif out.result is Result.FAILED and out.chain_status == "pending":
        delay = random.uniform(1.0, 5.0)  # the clients already backed off; spread the retries
        self.app.send_task(STEP_TASK, args=[chain_id, step], countdown=delay)
    log.info("chain %s step %s: %s", chain_id, step, out.result.value)
    return out.result.value
