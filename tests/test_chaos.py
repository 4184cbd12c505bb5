"""Failure handling end to end: the chaos run's short form, and graceful worker shutdown.

The chaos run starts its own PostgreSQL cluster and Redis on free ports (it restarts them), so it
never touches the shared services; see benchmarks/chaos.py for what it injects and checks.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from benchmarks import chaos
from qalign.storage.migrate import upgrade
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.sweeps_support import (
    Worker,
    check_invariants,
    cli,
    steps_committed,
    sweep_config,
    wait_done,
    workers,
    write_config,
)


@pytest.mark.timeout(540)  # the short chaos plan, with room for a loaded 2-core machine
def test_chaos_run_short_form_loses_nothing_and_stays_exact():
    report = chaos.run(chaos.SHORT, log=lambda line: print(line, flush=True))
    print(report.table())
    assert report.ok, report.table()
    assert report.missing == 0 and report.duplicates == 0
    assert report.steps_committed == report.steps_expected
    for kind in chaos.KINDS:
        assert report.injected[kind] >= 1, kind


@pytest.mark.timeout(540)  # as above; the SMC plan's generator is slower, its sweep smaller
def test_chaos_run_short_form_over_an_smc_sweep_equals_a_crash_free_run():
    """Worker SIGKILLs, Redis and PostgreSQL restarts and server faults over SMC particles: no
    block lost or doubled, every barrier once, and every row equals a crash-free run's."""
    report = chaos.run(chaos.SMC_SHORT, log=lambda line: print(line, flush=True))
    print(report.table())
    assert report.ok, report.table()
    assert report.missing == 0 and report.duplicates == 0
    assert report.steps_committed == report.steps_expected
    plan = chaos.SMC_SHORT
    assert report.barriers == plan.prompts * (plan.steps - 1)
    assert report.same_as_crash_free is True
    assert report.barrier_waits >= 1  # particles did wait at barriers, and were woken
    for kind in ("kill", "redis", "postgres"):
        assert report.injected[kind] >= 1, kind


def test_sigterm_finishes_in_flight_steps_and_a_second_worker_takes_over(pg_url, tmp_path, broker):
    """Warm shutdown: the running steps commit and hand their chains on; nothing needs a reap."""
    slow = ToyServerOptions(served_model_names=("toy-lm",), port=0, latency_base=1.0)
    with (
        serve_in_thread(slow) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        cfg = sweep_config("graceful", g.url, r.url, prompts=2, beta=1.0, steps=3, chains=6)
        upgrade(pg_url)
        path = write_config(tmp_path, cfg)
        assert cli("sweep", "create", str(path), "--database", pg_url).returncode == 0
        first = Worker("leaving@host", pg_url, broker, concurrency=6)
        with workers(first):
            out = cli("sweep", "run", "graceful", "--database", pg_url, env=broker.env())
            assert out.returncode == 0, out.stderr
            deadline = time.monotonic() + 240
            while steps_committed(pg_url) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            # SIGTERM only while the worker is mid-step against the 1 s generator (observed,
            # not assumed: a loaded machine can pause between steps).
            while g.metrics()["running_sequences"] == 0:
                assert time.monotonic() < deadline, first.output()[-2000:]
                time.sleep(0.05)
            before = steps_committed(pg_url)
            first.kill(signal.SIGTERM)
            assert first.proc.returncode == 0, first.output()[-2000:]
        log = first.output()
        shutdown_at = log.index("Warm shutdown")
        finished = re.findall(r"chain \d+ step \d+: committed", log[shutdown_at:])
        assert len(finished) >= 1, log[-3000:]  # in-flight steps ran to their commit
        assert steps_committed(pg_url) >= before + len(finished)
        assert steps_committed(pg_url) < 12 * 4  # the sweep was not finished by the first worker
        # no reap, no resume: what the first worker released is still in the broker
        with workers(Worker("arriving@host", pg_url, broker, concurrency=6)):
            wait_done(pg_url, 12, timeout=300)
    check_invariants(pg_url)


def test_failed_attempts_are_kept_with_reasons_after_the_step_succeeds(sqlite_url, tmp_path, toy):
    import json

    from sqlalchemy import select

    from qalign.storage import repo
    from qalign.storage.engine import make_engine, make_sessionmaker
    from qalign.storage.models import Chain

    path = write_config(
        tmp_path, sweep_config("errs", *toy, prompts=1, beta=1.0, steps=1, chains=1)
    )
    upgrade(sqlite_url)
    assert cli("sweep", "create", str(path), "--database", sqlite_url).returncode == 0
    sessions = make_sessionmaker(make_engine(sqlite_url))
    with sessions() as s:
        chain_id = s.execute(select(Chain.id)).scalar_one()
    boom = "ServerUnavailableError: POST /v1/completions: no answer after 4 attempt(s)"
    assert repo.record_failure(sessions, chain_id, 0, boom, 5) == ("pending", 1)
    assert repo.record_failure(sessions, chain_id, 0, "ProtocolError: not JSON", 5)[0] == "pending"
    assert repo.record_failure(sessions, chain_id, 0, "no type prefix here", 5) == ("pending", 3)
    run = cli("run", str(path), "--database", sqlite_url, "--quiet")
    assert run.returncode == 0, run.stderr
    sweep_id = repo.find_sweep(sessions, "errs").id
    (row,) = repo.sweep_status(sessions, sweep_id)
    assert row.chains_done == 1 and row.chains_with_errors == 0  # the chain recovered
    assert row.step_errors == 3
    assert row.error_kinds == {"ServerUnavailableError": 1, "ProtocolError": 1, "error": 1}
    text = cli("sweep", "status", "errs", "--database", sqlite_url).stdout
    assert "failed step attempts: 3" in text
    assert "ServerUnavailableError" in text and "step 0: ProtocolError: not JSON" in text
    rows = json.loads(cli("sweep", "status", "errs", "--database", sqlite_url, "--json").stdout)
    assert rows[0]["step_errors"] == 3


def test_worker_started_while_the_database_restarts_waits_for_it(broker):
    pg = chaos.PrivatePostgres()
    try:
        pg.start()
        upgrade(pg.url)
        pg.stop("immediate")
        w = Worker("patient@host", pg.url, broker, concurrency=1)
        with workers(w):
            deadline = time.monotonic() + 300  # both waits share it; a loaded machine is slow
            while "waiting for the database" not in w.output() and time.monotonic() < deadline:
                assert w.proc.poll() is None, w.output()
                time.sleep(0.2)
            pg.start()
            while " ready." not in w.output() and time.monotonic() < deadline:
                assert w.proc.poll() is None, w.output()
                time.sleep(0.2)
            assert " ready." in w.output(), w.output()
    finally:
        pg.destroy()
