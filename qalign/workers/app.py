"""The Celery adapter over the step service: a worker app built from its settings.

`worker_app(settings)` returns a Celery app with the `qalign.step` task registered against a
`WorkerRuntime` (the settings, the process's step service, the shutdown flag): nothing is read
from module globals or the environment per step. A task drives its chain through the shared
`drive` loop and after-step policy with a per-task budget, then hands the chain on (or schedules
the retry) through a `CeleryDispatcher` on the same app.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down

from qalign.dispatch.base import STEP_TASK
from qalign.dispatch.celery import READY_AT_HEADER, CeleryDispatcher, celery_app
from qalign.sampling.loop import run_sync
from qalign.steps.drive import drive, follow
from qalign.steps.metrics import StepMetrics, serve_metrics
from qalign.steps.policy import DEFERRED_S, Action, Budget, Next
from qalign.steps.service import DatabaseFailure, StepService
from qalign.storage.errors import ChainNotFoundError
from qalign.workers.backlog import Backlog
from qalign.workers.messages import InvalidStepArgsError, drop_line, parse_step_args
from qalign.workers.pool import WarmThreadPool
from qalign.workers.settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkerRuntime:
    """What the tasks of one worker process share."""

    def __init__(self, settings: WorkerSettings, backlog: Callable[[], bool] | None = None) -> None:
        self.settings = settings
        self.budget = Budget(steps=settings.steps_per_task, seconds=settings.task_budget_s)
        # Past its budget a task keeps its chain unless other chains wait (None: always hand on)
        self.backlog = backlog
        # Set when the worker starts a warm shutdown: tasks stop after their current step and
        # hand the chain on through the broker instead of running their remaining budget.
        self.shutting_down = threading.Event()
        self._lock = threading.Lock()
        self._service: StepService | None = None
        # Made before the service (built on the first task), so /metrics serves from start-up.
        self.metrics = StepMetrics()

    def service(self) -> StepService:
        """The process's step service (database engine and server clients), built on first use."""
        with self._lock:
            if self._service is None:
                from qalign.storage.engine import make_engine, make_sessionmaker

                engine = make_engine(self.settings.database_url)
                self._service = StepService(
                    make_sessionmaker(engine),
                    worker=self.settings.name,
                    db_threads=self.settings.db_threads,
                    metrics=self.metrics,
                )
            return self._service

    def close(self) -> None:
        """Close the step service's clients and database threads, if it was built."""
        with self._lock:
            service, self._service = self._service, None
        if service is not None:
            run_sync(service.close())

    def take(
        self,
        chain_id: int,
        step: int,
        message_id: str,
        dispatcher: CeleryDispatcher,
        ready_at: float | None = None,
    ) -> tuple[str, Next]:
        """Drive a chain from `step` within the task budget; what follows goes to the broker
        (chains a step released go there at once).

        `ready_at` is when the message's step became runnable (its `qalign_ready_at` header).
        """
        try:
            out, nxt = run_sync(
                drive(
                    self.service(),
                    chain_id,
                    step,
                    budget=self.budget,
                    stopping=self.shutting_down.is_set,
                    on_wake=dispatcher.enqueue_many,
                    ready_at=ready_at,
                    contended=self.backlog,
                )
            )
        except ChainNotFoundError as exc:  # a message from elsewhere, or a deleted sweep
            log.error("%s", drop_line(message_id, STEP_TASK, str(exc)))
            return "invalid", Next(Action.STOP)
        except DatabaseFailure as exc:
            # Not this chain's fault, and nothing was half written: give the step back.
            log.error("chain %s step %s: %s; handing the step back", chain_id, step, exc)
            return "database-failure", Next(Action.RETRY, step, random.uniform(*DEFERRED_S))
        log.info("chain %s step %s: %s", chain_id, out.step, out.result.value)
        return out.result.value, nxt


def _ready_at(value: Any) -> float | None:
    """A message's ready-at header as a time, None when absent or not a number (a message
    published by an older qalign, or by hand: its queue wait then counts from the task start)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def worker_app(settings: WorkerSettings) -> tuple[Celery, WorkerRuntime]:
    """A Celery app that executes `qalign.step` tasks with `settings`."""
    app = celery_app(settings.broker)
    # Celery's consumer, except that kombu's AttributeError on a channel of a connection lost
    # to a broker restart does not stop the worker (see qalign.workers.consumer).
    app.conf.worker_consumer = "qalign.workers.consumer:BrokerRestartSafeConsumer"
    backlog = Backlog(app, settings.broker.queue) if settings.hand_on == "contended" else None
    runtime = WorkerRuntime(settings, backlog)
    dispatcher = CeleryDispatcher(app)

    @app.task(name=STEP_TASK, bind=True, ignore_result=True)
    def step_task(task: Any, *args: Any, **kwargs: Any) -> str:
        """Take step `step` of chain `chain_id` and, within the budget, the chain's next ones."""
        try:  # a message from elsewhere: one line, acknowledged (not a traceback per delivery)
            chain_id, step = parse_step_args(args, kwargs)
        except InvalidStepArgsError as exc:
            log.error("%s", drop_line(task.request.id, STEP_TASK, str(exc)))
            return "invalid"
        result, nxt = runtime.take(
            chain_id,
            step,
            task.request.id,
            dispatcher,
            _ready_at(task.request.get(READY_AT_HEADER)),
        )
        follow(dispatcher, chain_id, nxt)
        return result

    def on_shutdown(**_: Any) -> None:
        runtime.shutting_down.set()

    worker_shutting_down.connect(on_shutdown, weak=False)
    return app, runtime


def run_worker(settings: WorkerSettings) -> int:
    """Run a worker in this process until it stops; returns its exit code."""
    app, runtime = worker_app(settings)
    # Celery's `threads` pool: every task of this worker runs in this process, so one registry
    # counts every step (no multiprocess mode).
    server = (
        serve_metrics(runtime.metrics, settings.metrics_port) if settings.metrics_port else None
    )
    worker = app.Worker(
        hostname=settings.name,
        pool_cls=WarmThreadPool,
        concurrency=settings.concurrency,
        loglevel=settings.loglevel,
        without_gossip=True,
        without_mingle=True,
    )
    # Built and connected before the worker reports ready, so the first tasks' imports,
    # database threads and connections are not on the sweep's critical path. Only a head
    # start: a database gone since the CLI's check defers the steps, as it would later.
    try:
        runtime.service().warm()
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        log.warning(
            "could not open database connections before the first task (%s: %s); starting anyway",
            type(exc).__name__,
            first,
        )
    try:
        worker.start()
    finally:
        runtime.close()
        if server is not None:
            server.close()
    return int(worker.exitcode or 0)
