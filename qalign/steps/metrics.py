"""Prometheus metrics of the steps a process takes, and the `/metrics` endpoint serving them.

One `StepMetrics` per step service, in a registry of its own (not prometheus_client's global
one), so two services in one process (tests, benchmarks) never mix their counts. `qalign run`
and `qalign worker` serve it with `--metrics-port`; a worker runs its tasks in threads of one
process (Celery's `threads` pool), so one registry sees every step and no multiprocess mode is
needed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

PHASES = ("generator", "reward", "sql")
DATABASE_UNAVAILABLE = "DatabaseUnavailable"  # the error kind of a deferred step (not in SQL)
# From a cached reward (0) and a local SQLite commit (~100 µs) to a slow server's long answer.
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
)  # fmt: skip


class StepMetrics:
    """The counters, histogram and gauge of one step service (see README "Metrics")."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.committed = Counter(
            "qalign_steps_committed",
            "Steps this process committed (one proposal row each).",
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "qalign_step_phase_seconds",
            "Seconds a committed step spent per phase: generator requests, reward scoring "
            "(0 on a reward-cache hit), SQL (reading the chain and committing).",
            ["phase"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "qalign_step_errors",
            "Failed step attempts by kind (the step_errors.kind recorded for each); "
            f"kind {DATABASE_UNAVAILABLE} counts steps deferred because the database was "
            "unavailable, which leave no row.",
            ["kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "qalign_chains_in_flight",
            "Chains this process is driving right now.",
            registry=self.registry,
        )
        # Children made once: `labels()` takes a lock and a dict lookup per call.
        self._phase = {p: self.phase_seconds.labels(phase=p) for p in PHASES}

    def step_committed(self, generator_s: float, reward_s: float, sql_s: float) -> None:
        self.committed.inc()
        self._phase["generator"].observe(generator_s)
        self._phase["reward"].observe(reward_s)
        self._phase["sql"].observe(sql_s)

    def step_failed(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()


@dataclass
class MetricsServer:
    """A running `/metrics` endpoint; `close()` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class MetricsPortError(OSError):
    """The `/metrics` port cannot be bound."""


def serve_metrics(metrics: StepMetrics, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve `metrics` at http://host:port/metrics from a daemon thread.

    Raises:
        MetricsPortError: the port is taken or not allowed.
    """
    if not 0 < port < 65536:
        raise MetricsPortError(f"--metrics-port must be 1..65535, got {port}")
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise MetricsPortError(
            f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; pick a free port "
            "with --metrics-port (0 turns the endpoint off)"
        ) from exc
    log.info("serving Prometheus metrics at http://%s:%d/metrics", host, port)
    return MetricsServer(host, port, server, thread)
