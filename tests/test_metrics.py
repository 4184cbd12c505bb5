"""Prometheus `/metrics` of `qalign run` and `qalign worker`, scraped over HTTP and checked
against the database, and the wall-clock cost the steps store.

Each scrape happens once the process has nothing left in flight: `qalign run --metrics-linger`
says on stderr when its run is over and keeps serving; a worker keeps serving anyway, and the
test waits until the sweep has settled in the database and the worker's gauge is back to 0.
The toy generator fails every third generation seed once (`seeded_errors`), so each run has
failed attempts to count.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from qalign.clients.cache import CachedReward, score_meter
from qalign.clients.composite import ConstantScore
from qalign.dispatch.base import STEP_TASK
from qalign.dispatch.celery import READY_AT_HEADER, BrokerSettings, celery_app
from qalign.scheduler.sweeps import enqueue_unfinished
from qalign.steps.metrics import MetricsPortError, StepMetrics, serve_metrics
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import upgrade
from qalign.storage.models import Chain, Proposal, Run, StepError, Sweep
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.runners import SETTLED, chain_statuses
from tests.sweeps_support import QALIGN, ROOT, Broker, Worker, cli, sweep_config, workers
from tests.sweeps_support import write_config as write_cfg

DEADLINE_S = 240.0  # below pytest's per-test timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> dict[str, Any]:
    """The samples of a /metrics page: {name: value} and {name: {label value: value}}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, Any] = {"errors": {}, "phase_count": {}, "phase_sum": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qalign_steps_committed_total":
                out["committed"] = sample.value
            elif sample.name == "qalign_step_errors_total":
                out["errors"][sample.labels["kind"]] = sample.value
            elif sample.name == "qalign_chains_in_flight":
                out["in_flight"] = sample.value
            elif sample.name == "qalign_step_phase_seconds_count":
                out["phase_count"][sample.labels["phase"]] = sample.value
            elif sample.name == "qalign_step_phase_seconds_sum":
                out["phase_sum"][sample.labels["phase"]] = sample.value
    return out


def from_db(db_url: str, sweep: str) -> dict[str, Any]:
    """What the database holds for `sweep`: proposals, step errors by kind, cost sums."""
    sessions = make_sessionmaker(make_engine(db_url))
    runs = select(Run.id).join(Sweep, Sweep.id == Run.sweep_id).where(Sweep.name == sweep)
    with sessions() as s:
        n, gen, rm = s.execute(
            select(
                func.count(Proposal.id),
                func.sum(Proposal.generator_seconds),
                func.sum(Proposal.reward_seconds),
            ).where(Proposal.run_id.in_(runs))
        ).one()
        kinds = s.execute(
            select(StepError.kind, func.count())
            .where(StepError.run_id.in_(runs))
            .group_by(StepError.kind)
        ).all()
    return {"proposals": n, "errors": dict(kinds), "generator": gen, "reward": rm}


def check_against_db(metrics: dict[str, Any], db: dict[str, Any]) -> None:
    assert metrics["committed"] == db["proposals"] > 0
    assert metrics["errors"] == db["errors"] and sum(db["errors"].values()) > 0
    assert metrics["in_flight"] == 0
    assert metrics["phase_count"] == {p: db["proposals"] for p in ("generator", "reward", "sql")}
    # The histogram observed the very values the proposals store.
    assert math.isclose(metrics["phase_sum"]["generator"], db["generator"], rel_tol=1e-9)
    assert math.isclose(metrics["phase_sum"]["reward"], db["reward"], rel_tol=1e-9)


@pytest.fixture
def faulty_toy() -> Any:
    """A toy generator failing each generation seed that is a multiple of 3 once, and a toy
    reward model: their URLs."""
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        req = urllib.request.Request(
            g.url + "/admin/faults",
            data=json.dumps({"seeded_errors": 1, "seeded_error_every": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req) as resp:
            resp.read()
        yield g.url, r.url


def _config(name: str, gen: str, rm: str) -> dict[str, Any]:
    cfg = sweep_config(name, gen, rm, prompts=2, beta=1.0, steps=4, chains=2)
    cfg["generator"]["max_retries"] = 1  # a 503 fails the attempt: a step_errors row
    return cfg


def test_run_metrics_scrape_matches_the_database(faulty_toy: Any, tmp_path: Path) -> None:
    gen, rm = faulty_toy
    db = f"sqlite:///{tmp_path / 'run.sqlite'}"
    path = write_cfg(tmp_path, _config("scrape-run", gen, rm))
    port = _free_port()
    err = tmp_path / "run.stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [*QALIGN, "run", str(path), "--database", db, "--quiet",
             "--metrics-port", str(port), "--metrics-linger"],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=os.environ.copy(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "run finished; serving" not in err.read_text():
            assert proc.poll() is None, err.read_text()[-4000:]
            assert time.monotonic() < deadline, err.read_text()[-4000:]
            time.sleep(0.2)
        check_against_db(scrape(f"http://127.0.0.1:{port}/metrics"), from_db(db, "scrape-run"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, err.read_text()[-4000:]


class _LateDispatcher:
    """Publishes step hints stamped as runnable `late` seconds ago."""

    def __init__(self, broker: Broker, late: float) -> None:
        self.app = celery_app(BrokerSettings(url=broker.url, queue=broker.queue))
        self.late = late

    def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None:
        raise AssertionError("the scheduler only enqueues in bulk")

    def enqueue_many(self, items: Any) -> int:
        n = 0
        for chain_id, step in items:
            headers = {READY_AT_HEADER: time.time() - self.late}
            self.app.send_task(STEP_TASK, args=[chain_id, step], headers=headers)
            n += 1
        return n


def test_worker_metrics_scrape_matches_the_database(
    faulty_toy: Any, pg_url: str, broker: Broker, tmp_path: Path
) -> None:
    """Also: a worker reads the hint's ready-at header, so a step published as runnable long
    ago stores that wait."""
    gen, rm = faulty_toy
    upgrade(pg_url)
    port = _free_port()
    worker = Worker("metrics@host", pg_url, broker, concurrency=4,
                    args=("--metrics-port", str(port)), log_dir=tmp_path)  # fmt: skip
    with workers(worker):
        created = cli("sweep", "create", str(write_cfg(tmp_path, _config("scrape-w", gen, rm))),
                      "--database", pg_url)  # fmt: skip
        assert created.returncode == 0, created.stderr
        sessions = make_sessionmaker(make_engine(pg_url))
        sweep_id = sessions().execute(select(Sweep.id).where(Sweep.name == "scrape-w")).scalar()
        late = 1000.0
        assert enqueue_unfinished(sessions, sweep_id, _LateDispatcher(broker, late)) == 4
        deadline = time.monotonic() + DEADLINE_S
        url = f"http://127.0.0.1:{port}/metrics"
        while True:
            assert worker.proc.poll() is None, worker.output()[-4000:]
            assert time.monotonic() < deadline, worker.output()[-4000:]
            statuses = chain_statuses(sessions, "scrape-w")
            if statuses and all(s in SETTLED for s in statuses):
                metrics = scrape(url)
                if metrics.get("in_flight") == 0:
                    break
            time.sleep(0.2)
        assert set(statuses) == {"done"}
        check_against_db(metrics, from_db(pg_url, "scrape-w"))
        with sessions() as s:
            waits = dict(
                s.execute(
                    select(Proposal.step, func.max(Proposal.queue_seconds))
                    .join(Chain, Chain.id == Proposal.chain_id)
                    .where(Chain.run_id.in_(select(Run.id).where(Run.sweep_id == sweep_id)))
                    .group_by(Proposal.step)
                ).all()
            )
        assert waits[0] >= late  # a published hint (not a retry: a failed step 0 is re-sent)
        assert all(0.0 <= w < late for step, w in waits.items() if step > 0)


# ---- in-process pieces ---------------------------------------------------------------------


def test_a_port_in_use_is_refused_with_the_flag_to_change() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortError, match="--metrics-port"):
            serve_metrics(StepMetrics(), port)


def test_two_services_count_apart() -> None:
    a, b = StepMetrics(), StepMetrics()
    a.step_committed(0.5, 0.0, 0.001)
    a.step_failed("ServerUnavailableError")
    assert a.registry.get_sample_value("qalign_steps_committed_total") == 1
    assert b.registry.get_sample_value("qalign_steps_committed_total") == 0
    assert a.registry.get_sample_value(
        "qalign_step_errors_total", {"kind": "ServerUnavailableError"}
    ) == 1  # fmt: skip


def test_score_meter_tells_a_cache_hit_from_a_server_call() -> None:
    conv = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    cached = CachedReward(ConstantScore(1.0))

    async def go() -> list[tuple[int, int, bool]]:
        out = []
        for rm in (cached, cached, ConstantScore(2.0)):
            with score_meter() as meter:
                await rm.score(conv)
            out.append((meter.hits, meter.misses, meter.free))
        return out

    # A scorer with no cache says nothing: its time counts as spent.
    assert asyncio.run(go()) == [(0, 1, False), (1, 0, True), (0, 0, False)]
