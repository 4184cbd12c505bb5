"""Distributed sweeps through real Celery worker subprocesses, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
import time

import pytest
from sqlalchemy import func, select

from qalign.config import parse_config
from qalign.core import KernelConfig
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.outcome import Result
from qalign.steps.service import StepService
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import upgrade
from qalign.storage.models import Chain, Proposal
from qalign.toy.exact import (
    empirical,
    step_distribution,
    total_variation,
    transition_matrix,
    tv_bound,
)
from qalign.toy.model import ToyModel
from tests.stub_servers import Gate, proxy_app, serve_in_background
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


def _create(db_url, tmp_path, cfg, broker):
    upgrade(db_url)
    path = write_config(tmp_path, cfg)
    out = cli("sweep", "create", str(path), "--database", db_url, env=broker.env())
    assert out.returncode == 0, out.stderr
    return path


def test_sweep_end_to_end_with_two_named_workers(pg_url, tmp_path, toy, broker):
    cfg = sweep_config("e2e", *toy, prompts=8, beta=[0.5, 1.0], steps=10, chains=2)
    _create(pg_url, tmp_path, cfg, broker)
    again = cli("sweep", "create", str(tmp_path / "e2e.yaml"), "--database", pg_url)
    assert again.returncode == 0 and "exists" in again.stdout  # not duplicated
    with workers(Worker("w1@hostA", pg_url, broker), Worker("w2@hostB", pg_url, broker)):
        out = cli("sweep", "run", "e2e", "--database", pg_url, env=broker.env())
        assert out.returncode == 0, out.stderr
        assert "enqueued 32" in out.stdout
        wait_done(pg_url, 2 * 8 * 2)
    check_invariants(pg_url)
    sessions = make_sessionmaker(make_engine(pg_url))
    with sessions() as s:
        by_worker = dict(
            s.execute(select(Proposal.worker, func.count()).group_by(Proposal.worker)).all()
        )
        assert s.execute(select(func.count()).select_from(Chain)).scalar() == 32
    assert set(by_worker) == {"w1@hostA", "w2@hostB"}, by_worker
    assert sum(by_worker.values()) == 32 * 11
    status = cli("sweep", "status", "e2e", "--database", pg_url, "--json")
    rows = json.loads(status.stdout)
    assert len(rows) == 2
    assert all(r["chains_done"] == 16 and r["steps_done"] == 16 * 11 for r in rows)
    assert all(0 < r["acceptance_rate"] <= 1 for r in rows)


def test_sigkilled_worker_loses_nothing_and_sampling_stays_exact(pg_url, tmp_path, toy, broker):
    n, k = 300, 6
    cfg = sweep_config("crash", *toy, prompts=1, beta=1.0, steps=k, chains=n)
    cfg["dataset"] = {"prompts": ["Answer yes or no."]}
    _create(pg_url, tmp_path, cfg, broker)
    first = Worker("victim@host", pg_url, broker, concurrency=16)
    with workers(first):
        assert cli("sweep", "run", "crash", "--database", pg_url, env=broker.env()).returncode == 0
        deadline = time.monotonic() + 240
        while steps_committed(pg_url) < n * (k + 1) // 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        first.kill()  # SIGKILL mid-sweep: in-flight and prefetched steps die with it
    assert steps_committed(pg_url) < n * (k + 1)
    with workers(Worker("rescuer@host", pg_url, broker, concurrency=16)):
        reap = cli("sweep", "reap", "--database", pg_url, "--stall-timeout", "0", env=broker.env())
        assert reap.returncode == 0, reap.stderr
        wait_done(pg_url, n)
    finals = check_invariants(pg_url)
    model = ToyModel()
    kernel = KernelConfig(beta=1.0, max_new_tokens=3)
    exact_k = step_distribution(model.lm_distribution(3), transition_matrix(model, kernel), k)
    final = empirical(list(finals.values()))
    assert total_variation(final, exact_k) < tv_bound(exact_k, n)


def test_redis_flushed_mid_run_then_resume_completes(pg_url, tmp_path, toy, broker):
    # A gate passes 40 of the 144 generations and holds the rest until the broker was flushed:
    # the flush always lands mid-sweep, however fast or slow the machine is.
    gate = Gate(allow=40)
    with serve_in_background(proxy_app(toy[0], gate=gate)) as gated:
        cfg = sweep_config("flush", gated, toy[1], prompts=4, beta=1.0, steps=8, chains=4)
        cfg["generator"]["timeout"] = 300  # held requests wait for the gate, not a retry
        _create(pg_url, tmp_path, cfg, broker)
        total = 16
        w = Worker("flushy@host", pg_url, broker, concurrency=4, log_dir=tmp_path)
        with contextlib.ExitStack() as stack:
            stack.enter_context(workers(w))
            # On the way out, open first: the worker's warm shutdown waits for held requests.
            stack.callback(gate.open)
            sent = cli("sweep", "run", "flush", "--database", pg_url, env=broker.env())
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 300  # wide for a loaded machine
            while steps_committed(pg_url) < 20:
                assert w.proc.poll() is None, w.output()[-4000:]
                assert time.monotonic() < deadline, w.output()[-4000:]
                time.sleep(0.05)
            broker.flush()  # the broker loses every message of this sweep (queue and unacked)
            assert steps_committed(pg_url) <= 40 < total * 9
            gate.open()
            out = cli("sweep", "resume", "flush", "--database", pg_url, env=broker.env())
            assert out.returncode == 0, out.stderr
            wait_done(pg_url, total)
    check_invariants(pg_url)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_duplicate_and_concurrent_delivery_change_nothing(backend, sqlite_url, pg_url, toy):
    url = sqlite_url if backend == "sqlite" else pg_url
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    cfg = parse_config(sweep_config("dup", *toy, prompts=1, beta=1.0, steps=3, chains=1))
    create_sweep(sessions, cfg, check=False)
    with sessions() as s:
        chain_id = s.execute(select(Chain.id)).scalar_one()

    async def twice_in_a_row():
        service = StepService(sessions)
        try:
            a = await service.take(chain_id, 0)
            b = await service.take(chain_id, 0)
            return a, b
        finally:
            await service.close()

    a, b = asyncio.run(twice_in_a_row())
    assert (a.result, b.result) == (Result.COMMITTED, Result.DUPLICATE)

    # the same step delivered twice at the same time, from two threads with their own loops
    results = []

    def deliver():
        async def one():
            service = StepService(sessions)
            try:
                return await service.take(chain_id, 1)
            finally:
                await service.close()

        results.append(asyncio.run(one()).result)

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(Result.COMMITTED) == 1
    assert set(results) <= {Result.COMMITTED, Result.DUPLICATE}
    with sessions() as s:
        steps = s.execute(select(Proposal.step).where(Proposal.chain_id == chain_id)).scalars()
        assert sorted(steps) == [0, 1]
        assert s.get(Chain, chain_id).current_step == 1


def test_duplicate_celery_messages_make_one_proposal(pg_url, tmp_path, toy, broker):

    cfg = sweep_config("dupmsg", *toy, prompts=2, beta=1.0, steps=4, chains=2)
    _create(pg_url, tmp_path, cfg, broker)
    _send_hints(broker, [(cid, 0) for cid in _chain_ids(pg_url) for _ in range(3)])
    with workers(Worker("dup@host", pg_url, broker, concurrency=8)):
        wait_done(pg_url, 4)
        _wait_drained(broker)  # the extra copies were consumed (and acknowledged) too
    check_invariants(pg_url)
    assert steps_committed(pg_url) == 4 * 5


def test_worker_refuses_a_database_not_at_head(sqlite_url, broker):
    out = cli("worker", "--database", sqlite_url, env=broker.env(), timeout=60)
    assert out.returncode != 0
    assert "qalign db upgrade" in out.stderr


def _wait_drained(broker, timeout=240):
    """Wait until every message was taken and acknowledged: an empty queue and no entry in
    kombu's unacked hash (an observable state, rather than a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while broker.queued() or broker.redis.hlen("unacked"):
        assert time.monotonic() < deadline, "messages still queued or unacknowledged"
        time.sleep(0.2)


def _send_hints(broker, items):
    """Publish (chain, step) messages on the test's queue, as a scheduler would."""
    dispatcher = broker.dispatcher()
    for cid, step in items:
        dispatcher.enqueue(cid, step)


def _chain_ids(db_url):
    with make_sessionmaker(make_engine(db_url))() as s:
        return s.execute(select(Chain.id).order_by(Chain.id)).scalars().all()


@pytest.mark.parametrize(("hand_on", "messages"), [("always", 3), ("contended", 1)])
def test_a_task_runs_several_steps_of_its_chain(pg_url, tmp_path, toy, broker, hand_on, messages):
    """QALIGN_STEPS_PER_TASK=3: with --hand-on always, 7 steps per chain take 3 messages; with
    the default (hand on only while other chains wait), 4 chains on 4 threads never wait, so
    each chain's first task takes all 7. Either way each step commits once."""
    cfg = sweep_config("multistep", *toy, prompts=2, beta=1.0, steps=6, chains=2)
    _create(pg_url, tmp_path, cfg, broker)
    env = {"QALIGN_STEPS_PER_TASK": "3", "QALIGN_HAND_ON": hand_on}
    with workers(Worker("multi@host", pg_url, broker, concurrency=4, env=env)) as (w,):
        assert (
            cli("sweep", "run", "multistep", "--database", pg_url, env=broker.env()).returncode == 0
        )
        wait_done(pg_url, 4)
    check_invariants(pg_url)
    assert steps_committed(pg_url) == 4 * 7
    received = [
        ln for ln in w.output().splitlines() if "Task qalign.step[" in ln and "received" in ln
    ]
    assert len(received) == 4 * messages


def test_a_stale_redelivery_adopts_an_orphaned_chain(pg_url, tmp_path, toy, broker):
    """A message for a step already taken adopts the chain only when the chain sat idle."""

    cfg = sweep_config("orphan", *toy, prompts=1, beta=1.0, steps=5, chains=2)
    _create(pg_url, tmp_path, cfg, broker)
    sessions = make_sessionmaker(make_engine(pg_url))
    orphan, live = _chain_ids(pg_url)

    async def two_steps():
        service = StepService(sessions)
        try:
            for cid in (orphan, live):
                for step in (0, 1):
                    out = await service.take(cid, step)
                    assert out.result is Result.COMMITTED
        finally:
            await service.close()

    asyncio.run(two_steps())
    # As if the worker that took step 1 of `orphan` died before enqueueing step 2, an hour ago.
    with sessions.begin() as s:
        s.get(Chain, orphan).updated_at = s.get(Chain, orphan).updated_at - dt.timedelta(hours=1)
    _send_hints(broker, [(orphan, 1), (live, 1)])  # redeliveries of a step both chains took
    with workers(Worker("adopt@host", pg_url, broker, concurrency=4)):
        wait_done(pg_url, 1)
        _wait_drained(broker)  # the live chain's redelivery was handled, not just waiting
    with sessions() as s:
        steps = dict(s.execute(select(Chain.id, Chain.current_step)).all())
    assert steps == {orphan: 5, live: 1}  # the orphan finished; the live chain was left alone
    assert steps_committed(pg_url) == 6 + 2
