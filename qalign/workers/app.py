"""The Celery app and the step task.

Delivery is at-least-once (late acks, redelivery when a worker dies); the effect of a step is
exactly-once because `advance` commits with a compare-and-set in SQL. Only JSON is accepted.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down

from qalign.scheduler.dispatch import STEP_TASK
from qalign.storage.errors import TRANSIENT_DB_ERRORS, ChainNotFoundError
from qalign.workers.messages import InvalidStepArgsError, drop_line, parse_step_args

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
        # Celery's consumer, except that kombu's AttributeError on a channel of a connection
        # lost to a broker restart (discarding it, or acking on it later) does not stop the
        # worker (see the module).
        worker_consumer="qalign.workers.consumer:BrokerRestartSafeConsumer",
        # Keep publishing through a broker restart (~40 s of retries) so the next-step hint of a
        # committed step survives it; past that the reaper re-enqueues the chain.
        task_publish_retry_policy={
            "max_retries": 25,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
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


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"${name} must be a number, got {raw!r}") from None


# Set when the worker starts a warm shutdown: tasks stop after their current step and hand the
# chain on through the broker instead of running their remaining budget.
shutting_down = threading.Event()


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    shutting_down.set()


@app.task(name=STEP_TASK, bind=True, ignore_result=True)
def step_task(self: Any, *args: Any, **kwargs: Any) -> str:
    """Take step `step` of chain `chain_id` and, within a small budget, the chain's next ones.

    One message per step costs more CPU in the broker round trip (publish, fetch, ack) than the
    step's own SQL, so a task keeps advancing its chain for up to `$QALIGN_STEPS_PER_TASK` steps
    (default 16) or `$QALIGN_TASK_BUDGET_S` seconds (default 10), then enqueues the next step.
    Each step is still its own compare-and-set commit: a task killed midway loses nothing, and
    its redelivered message adopts the chain once it has been idle (see `execute._precheck`).
    """
    from qalign.workers.execute import Result, advance_blocking

    try:  # a message from elsewhere: one line, acknowledged (not a traceback per delivery)
        chain_id, step = parse_step_args(args, kwargs)
    except InvalidStepArgsError as exc:
        log.error("%s", drop_line(self.request.id, STEP_TASK, str(exc)))
        return "invalid"
    per_task = max(1, int(_env_float("QALIGN_STEPS_PER_TASK", 16)))
    deadline = time.monotonic() + _env_float("QALIGN_TASK_BUDGET_S", 10.0)
    svc = services()
    for taken in range(1, per_task + 1):
        try:
            out = advance_blocking(svc, chain_id, step, max_attempts=max_attempts())
        except ChainNotFoundError as exc:
            log.error("%s", drop_line(self.request.id, STEP_TASK, str(exc)))
            return "invalid"
        except TRANSIENT_DB_ERRORS as exc:
            # The database is down or restarting. A step's commit is atomic, so nothing is half
            # written: hand the step back to the broker rather than let Celery ack it as failed.
            delay = random.uniform(2.0, 8.0)
            log.warning(
                "chain %s step %s: database unavailable (%s: %s); retrying in %.1f s",
                chain_id, step, type(exc).__name__, (str(exc).splitlines() or [""])[0][:200], delay,
            )  # fmt: skip
            self.app.send_task(STEP_TASK, args=[chain_id, step], countdown=delay)
            return "db-unavailable"
        log.info("chain %s step %s: %s", chain_id, step, out.result.value)
        if out.result is Result.FAILED:
            if out.chain_status == "pending":
                delay = random.uniform(1.0, 5.0)  # the clients already backed off; spread retries
                self.app.send_task(STEP_TASK, args=[chain_id, step], countdown=delay)
            break
        if out.next_step is None:
            break
        step = out.next_step
        if taken == per_task or time.monotonic() > deadline or shutting_down.is_set():
            self.app.send_task(STEP_TASK, args=[chain_id, step])
            break
    return out.result.value
