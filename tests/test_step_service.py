"""The step service's parts on their own: the after-step policy, the driver loop, the in-process
dispatcher, the run spec, and containment of an unexpected error to the chain that met it."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select

from qalign.config import parse_config
from qalign.dispatch.inprocess import InProcessDispatcher
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.drive import drive, follow
from qalign.steps.metrics import StepMetrics
from qalign.steps.outcome import Outcome, Result
from qalign.steps.policy import (
    DEFERRED_S,
    RETRY_CAP_S,
    UNLIMITED,
    Action,
    Budget,
    Next,
    after_step,
    retry_delay,
)
from qalign.steps.service import StepService
from qalign.steps.spec import RunSpec
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import upgrade
from qalign.storage.models import Chain, ChainStatus, StepError
from tests.sweeps_support import run_sweep_locally, sweep_config

# ---- after_step: one policy for every runner --------------------------------------------------


def committed(step: int, last: int = 10) -> Outcome:
    done = step >= last
    return Outcome(
        1,
        step,
        Result.COMMITTED,
        next_step=None if done else step + 1,
        chain_status=ChainStatus.DONE.value if done else ChainStatus.RUNNING.value,
    )


def test_a_committed_step_continues_until_the_last() -> None:
    assert after_step(committed(3)) == Next(Action.CONTINUE, 4)
    assert after_step(committed(10)) == Next(Action.STOP)


def test_a_spent_budget_or_a_shutdown_hands_the_chain_on() -> None:
    assert after_step(committed(3), taken=4, budget=Budget(steps=4)) == Next(Action.HAND_ON, 4)
    assert after_step(committed(3), taken=3, budget=Budget(steps=4)).action is Action.CONTINUE
    assert after_step(committed(3), elapsed=5.0, budget=Budget(seconds=5.0)).action is (
        Action.HAND_ON
    )
    assert after_step(committed(3), stopping=True) == Next(Action.HAND_ON, 4)
    # Nothing to hand on once the chain is done, whatever the budget.
    assert after_step(committed(10), stopping=True) == Next(Action.STOP)


def test_failed_attempts_retry_with_backoff_until_the_chain_fails() -> None:
    rng = random.Random(0)
    pending = Outcome(1, 4, Result.FAILED, chain_status="pending", attempts=3, error="boom")
    nxt = after_step(pending, rng=rng)
    assert nxt.action is Action.RETRY and nxt.step == 4
    assert 2.0 <= nxt.delay <= 4.0  # third attempt: 4 s x U(0.5, 1)
    failed = Outcome(1, 4, Result.FAILED, chain_status="failed", attempts=5, error="boom")
    assert after_step(failed) == Next(Action.STOP)


def test_an_unavailable_database_defers_the_step() -> None:
    nxt = after_step(Outcome(1, 4, Result.DEFERRED), rng=random.Random(1))
    assert nxt.action is Action.RETRY and nxt.step == 4
    assert DEFERRED_S[0] <= nxt.delay <= DEFERRED_S[1]


@pytest.mark.parametrize("result", [Result.DUPLICATE, Result.SKIPPED])
def test_duplicates_and_skips_stop(result: Result) -> None:
    assert after_step(Outcome(1, 4, result)) == Next(Action.STOP)


def test_retry_delay_doubles_and_is_capped() -> None:
    rng = random.Random(2)
    for attempts in range(1, 12):
        d = retry_delay(attempts, rng)
        full = min(RETRY_CAP_S, 2.0 ** (attempts - 1))
        assert full / 2 <= d <= full


def test_budget() -> None:
    assert not UNLIMITED.spent(10**6, 1e9)
    assert Budget(steps=2).spent(2, 0.0) and not Budget(steps=2).spent(1, 0.0)
    assert Budget(seconds=1.0).spent(1, 1.0) and not Budget(seconds=1.0).spent(1, 0.5)


# ---- drive + follow ---------------------------------------------------------------------------


@dataclass
class ScriptedService:
    """Answers `take` from a script of outcomes, recording the calls."""

    script: list[Outcome]
    calls: list[tuple[int, int]] = field(default_factory=list)
    metrics: StepMetrics = field(default_factory=StepMetrics)

    async def take(
        self, chain_id: int, step: int, ready_at: float | None = None, known: Any = None
    ) -> Outcome:
        self.calls.append((chain_id, step))
        return self.script.pop(0)


@dataclass
class RecordingDispatcher:
    hints: list[tuple[int, int, float | None]] = field(default_factory=list)

    def enqueue(self, chain_id: int, step: int, countdown: float | None = None) -> None:
        self.hints.append((chain_id, step, countdown))

    def enqueue_many(self, items: Any) -> int:
        items = list(items)
        self.hints.extend((c, s, None) for c, s in items)
        return len(items)


async def test_drive_takes_steps_until_the_policy_stops_and_follow_hands_on() -> None:
    svc = ScriptedService([committed(1), committed(2), committed(3)])
    seen: list[Outcome] = []
    out, nxt = await drive(svc, 1, 1, budget=Budget(steps=3), on_outcome=seen.append)  # type: ignore[arg-type]
    assert svc.calls == [(1, 1), (1, 2), (1, 3)]
    assert [o.step for o in seen] == [1, 2, 3] and out.step == 3
    assert nxt == Next(Action.HAND_ON, 4)
    d = RecordingDispatcher()
    follow(d, 1, nxt)
    assert d.hints == [(1, 4, None)]


async def test_drive_hands_a_failed_attempt_to_the_dispatcher_with_its_delay() -> None:
    failed = Outcome(7, 2, Result.FAILED, chain_status="pending", attempts=1, error="503")
    svc = ScriptedService([committed(1), failed])
    _, nxt = await drive(svc, 7, 1)  # type: ignore[arg-type]
    assert nxt.action is Action.RETRY and 0.5 <= nxt.delay <= 1.0
    d = RecordingDispatcher()
    follow(d, 7, nxt)
    assert d.hints == [(7, 2, nxt.delay)]
    follow(d, 7, Next(Action.STOP))
    assert len(d.hints) == 1


# ---- the in-process dispatcher ----------------------------------------------------------------


async def test_in_process_dispatcher_runs_hints_including_those_enqueued_meanwhile() -> None:
    done: list[tuple[int, int]] = []

    async def handler(chain_id: int, step: int, ready_at: float) -> None:
        done.append((chain_id, step))
        if step < 3:
            disp.enqueue(chain_id, step + 1, countdown=0.01 if chain_id == 2 else None)

    disp = InProcessDispatcher(handler)
    assert disp.enqueue_many([(1, 1), (2, 1)]) == 2
    await disp.join()
    assert sorted(done) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert disp.pending == 0


async def test_in_process_dispatcher_stops_on_a_handler_error_and_cancels_the_rest() -> None:
    release = asyncio.Event()
    cancelled: list[int] = []

    async def handler(chain_id: int, step: int, ready_at: float) -> None:
        if chain_id == 1:
            raise RuntimeError("database is read-only")
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(chain_id)
            raise

    disp = InProcessDispatcher(handler)
    disp.enqueue(2, 1)
    disp.enqueue(3, 1, countdown=3600)
    disp.enqueue(1, 1)
    with pytest.raises(RuntimeError, match="read-only"):
        await disp.join()
    await asyncio.sleep(0)  # let the cancelled handler see its cancellation
    assert cancelled == [2]
    assert disp.pending == 0


# ---- the run spec -----------------------------------------------------------------------------


def test_run_spec_round_trips_through_the_stored_config(tmp_path: Any) -> None:
    raw = sweep_config("spec", "http://127.0.0.1:9", "http://127.0.0.1:9", beta=[0.5, 2.0])
    raw["execution"] = {"concurrency": 3, "max_attempts": 2, "stall_timeout": 42}
    cfg = parse_config(raw)
    specs = cfg.runs()
    assert len(specs) == 2
    for spec in specs:
        again = RunSpec.from_config(spec.to_config())
        assert again == spec
        assert again.kernel == spec.kernel and again.sampling == spec.sampling
        assert again.execution.max_attempts == 2 and again.execution.stall_timeout == 42.0
        with pytest.raises(AttributeError):
            spec.steps = 1  # type: ignore[misc]


# ---- containment ------------------------------------------------------------------------------


def test_an_unexpected_error_is_recorded_against_its_chain_only(
    sqlite_url: str, toy: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = sweep_config("contain", *toy, prompts=2, beta=1.0, steps=4, chains=2)
    raw["execution"] = {"max_attempts": 2}
    engine = make_engine(sqlite_url)
    try:
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        sweep_id, _ = create_sweep(sessions, parse_config(raw))
        with sessions() as s:
            victim = s.scalars(select(Chain.id).order_by(Chain.id)).first()
        real = StepService._sample

        async def sample(self: StepService, loaded: Any, step: int) -> Any:
            if loaded.chain.chain_id == victim and step == 2:
                raise ZeroDivisionError("float division by zero")
            return await real(self, loaded, step)

        monkeypatch.setattr(StepService, "_sample", sample)
        monkeypatch.setattr("qalign.steps.policy.RETRY_BASE_S", 0.01)

        run_sweep_locally(sessions, sweep_id)
        with sessions() as s:
            chains = {c.id: c for c in s.scalars(select(Chain))}
            errors = s.execute(select(StepError.chain_id, StepError.step, StepError.error)).all()
        assert chains[victim].status == "failed"
        assert all(c.status == "done" for cid, c in chains.items() if cid != victim)
        assert len(errors) == 2 and {(e.chain_id, e.step) for e in errors} == {(victim, 2)}
        assert all("ZeroDivisionError" in e.error for e in errors)
        assert all("test_step_service.py" in e.error for e in errors)  # where it was raised
    finally:
        engine.dispose()


def test_a_driver_reads_its_chain_once_and_goes_on_from_its_own_commits(
    sqlite_url: str, toy: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first step a driver carries the chain its commit left (`Outcome.row`)
    instead of reading it back; a failed attempt (no commit) reads it again. The chains
    end exactly where they would with a read per step (the same steps, same states)."""
    from qalign.storage import repo

    raw = sweep_config("carry", *toy, prompts=1, beta=1.0, steps=6, chains=2)
    engine = make_engine(sqlite_url)
    reads: list[int] = []
    real_read = repo.read_chain

    def counting_read(sessions: Any, chain_id: int) -> Any:
        reads.append(chain_id)
        return real_read(sessions, chain_id)

    try:
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        sweep_id, _ = create_sweep(sessions, parse_config(raw))
        monkeypatch.setattr(repo, "read_chain", counting_read)

        run_sweep_locally(sessions, sweep_id)
        with sessions() as s:
            chains = list(s.scalars(select(Chain).order_by(Chain.id)))
        assert [c.status for c in chains] == ["done", "done"]
        assert sorted(reads) == sorted(c.id for c in chains)  # one read per chain, 7 steps each
        for c in chains:  # what the carried rows decided is what is stored
            stored = real_read(sessions, c.id)
            assert stored.current_step == 6 and stored.state is not None
            assert list(stored.state.tokens) == c.state_tokens
    finally:
        engine.dispose()


def test_past_its_budget_a_driver_keeps_its_chain_while_no_other_chain_waits() -> None:
    asked: list[bool] = []

    def contended(answer: bool) -> Any:
        def ask() -> bool:
            asked.append(answer)
            return answer

        return ask

    budget = Budget(steps=2)
    out = committed(3)
    assert after_step(out, taken=1, budget=budget, contended=contended(True)).action is (
        Action.CONTINUE
    )
    assert asked == []  # asked only once the budget is spent
    assert after_step(out, taken=2, budget=budget, contended=contended(True)).action is (
        Action.HAND_ON
    )
    assert after_step(out, taken=2, budget=budget, contended=contended(False)).action is (
        Action.CONTINUE
    )
    assert after_step(out, taken=9, budget=budget).action is Action.HAND_ON  # no check: hand on
    # a shutdown hands on whatever the backlog
    assert after_step(out, taken=1, budget=budget, stopping=True,
                      contended=contended(False)).action is Action.HAND_ON  # fmt: skip
    assert asked == [True, False]


def test_the_backlog_is_the_broker_queue_or_reserved_messages(broker: Any) -> None:
    from qalign.dispatch.celery import BrokerSettings, celery_app
    from qalign.workers.backlog import Backlog

    app = celery_app(BrokerSettings(url=broker.url, queue=broker.queue))
    backlog = Backlog(app, broker.queue, every=0.0)
    assert backlog() is False  # nothing declared yet, nothing waits
    broker.dispatcher().enqueue(1, 0)
    assert broker.queued() == 1
    assert backlog() is True
    broker.flush()
    assert backlog() is False
    cached = Backlog(app, broker.queue, every=3600.0)
    assert cached() is False
    broker.dispatcher().enqueue(1, 0)
    assert cached() is False  # within `every`: the last answer


def test_sqlite_commits_go_to_one_writer_thread_a_batch_at_a_time(
    sqlite_url: str, toy: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the steps' commits run on one writer thread, never two batches at once; the
    steps that reach their commit meanwhile go together in the next batch."""
    import threading

    from qalign.storage import repo

    raw = sweep_config("writer", *toy, prompts=2, beta=1.0, steps=5, chains=8)
    engine = make_engine(sqlite_url)
    real = repo.commit_steps
    lock = threading.Lock()
    busy = [0]
    seen: list[tuple[str, int, int]] = []  # (thread, batch size, batches in flight)

    def commit_steps(sessions: Any, batch: list[dict[str, Any]]) -> list[int | None]:
        with lock:
            busy[0] += 1
            seen.append((threading.current_thread().name, len(batch), busy[0]))
        try:
            return real(sessions, batch)
        finally:
            with lock:
                busy[0] -= 1

    try:
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        sweep_id, _ = create_sweep(sessions, parse_config(raw))
        monkeypatch.setattr(repo, "commit_steps", commit_steps)

        run_sweep_locally(sessions, sweep_id)
        with sessions() as s:
            chains = list(s.scalars(select(Chain)))
        assert len(chains) == 16 and all(c.status == "done" for c in chains)
        assert sum(n for _, n, _ in seen) == 16 * 6  # every step committed once
        assert {t for t, _, _ in seen} == {"qalign-writer_0"}
        assert max(k for _, _, k in seen) == 1
        assert max(n for _, n, _ in seen) > 1  # steps went together
    finally:
        engine.dispose()


def test_warm_starts_the_database_threads_and_checks_the_database(pg_url: str) -> None:
    """`StepService.warm` (a worker's start) starts the database threads and opens one
    PostgreSQL connection (not one per thread: several workers starting together must not
    take the server's connections for idle ones); a database that cannot be reached raises."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    engine = make_engine(pg_url, pool_size=4)
    try:
        service = StepService(make_sessionmaker(engine), db_threads=3)
        service.warm()
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        assert service._pool is not None and len(service._pool._threads) == 3
        asyncio.run(service.close())
    finally:
        engine.dispose()
    dead = make_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2", pool_size=4
    )
    try:
        service = StepService(make_sessionmaker(dead), db_threads=3)
        with pytest.raises((OperationalError, psycopg.OperationalError), match=r"127\.0\.0\.1"):
            service.warm()
        asyncio.run(service.close())
    finally:
        dead.dispose()


def test_the_worker_pool_starts_all_its_threads_before_the_first_task() -> None:
    from qalign.workers.pool import WarmThreadPool

    pool = WarmThreadPool(limit=12)
    pool.start()
    try:
        assert len(pool.executor._threads) == 12
        assert pool.apply_async(lambda: None) is not None
    finally:
        pool.stop()
