"""Everything a worker process is built with, decided once by whoever starts it."""

from __future__ import annotations

from dataclasses import dataclass, field

from qalign.dispatch.celery import BrokerSettings

HAND_ON = ("contended", "always")


@dataclass(frozen=True)
class WorkerSettings:
    """A worker's settings (`qalign worker` fills them from its flags and the environment).

    Args:
        database_url: the database every step reads and commits to.
        name: the Celery node name, also stored with every proposal the worker commits.
        broker: the broker and queue the worker consumes.
        concurrency: threads, i.e. steps of any sweep in flight at once in this process.
        steps_per_task: steps of one chain a task takes before handing the chain on.
        task_budget_s: seconds a task keeps one chain before handing it on.
        hand_on: when a task whose budget is spent hands its chain on: "contended" (only while
            other chains wait for a slot) or "always".
        metrics_port: serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: off).
    """

    database_url: str
    name: str
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    concurrency: int = 32
    steps_per_task: int = 16
    task_budget_s: float = 10.0
    hand_on: str = "contended"
    loglevel: str = "INFO"
    db_threads: int = 32
    metrics_port: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.steps_per_task < 1:
            raise ValueError(f"steps_per_task must be >= 1, got {self.steps_per_task}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        if self.hand_on not in HAND_ON:
            raise ValueError(f"hand_on must be one of {', '.join(HAND_ON)}, not {self.hand_on!r}")
        if not self.task_budget_s > 0:
            raise ValueError(f"task_budget_s must be > 0, got {self.task_budget_s}")
