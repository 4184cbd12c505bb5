"""`StepService.take`: one step of one stored chain, for every runner.

Reads the chain in one short transaction, talks to the servers with no transaction open, then
commits the proposal and the chain's new state in a second transaction guarded by a
compare-and-set on the chain's step. A duplicated, replayed or concurrent delivery of the same
(chain, step) therefore adds nothing and moves nothing.

Whatever goes wrong in a step is that chain's business: a server error, a malformed answer, a
bad credential, even a bug, is recorded in `step_errors` against the chain (the step is retried
until `execution.max_attempts`), with API keys masked. Only the database being unavailable
defers the step without recording anything, and a database that cannot be used at all (read-only,
full, corrupt) raises `DatabaseFailure`: that is no chain's fault, and a runner should stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import socket
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qalign.clients.base import Conversation, Generator
from qalign.clients.credentials import api_key
from qalign.clients.errors import ClientError, CredentialsError, PromptTooLongError
from qalign.clients.registry import ClientRegistry
from qalign.clients.spec import GeneratorSpec, RewardSpec
from qalign.core import State
from qalign.core.stopping import StopRule, state_traces, verdict
from qalign.sampling.smc import Start, smc_block
from qalign.sampling.step import (
    ChainSpec,
    StepRecord,
    check_prompt_length,
    initial_step,
    mcmc_step,
    warm_start_step,
)
from qalign.steps.metrics import DATABASE_UNAVAILABLE, StepMetrics
from qalign.steps.outcome import Outcome, Result
from qalign.steps.smc import barrier as smc_barrier
from qalign.steps.smc import released_by_failure as smc_released
from qalign.steps.spec import RunSpec
from qalign.steps.threads import start_threads
from qalign.storage import repo
from qalign.storage.errors import (
    TRANSIENT_DB_ERRORS,
    ChainNotFoundError,
    SQLiteFileError,
    StorageError,
    sqlite_file_error,
)
from qalign.storage.models import ChainStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

SPEC_TTL_S = 30.0  # how long a process trusts a run's stored settings before reading them again
VERDICTS_KEPT = 10_000  # `stop_when` verdicts remembered per process (siblings ask too)


class DatabaseFailure(StorageError):
    """The database refused a step's read or write for a reason no retry fixes by itself."""


class StepStalledError(TimeoutError):
    """A step took longer than its run's `execution.stall_timeout`."""


def default_worker_name() -> str:
    """Who took a step when the runner gives no name: host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _database_error(exc: BaseException) -> bool:
    """Whether `exc` comes from the database driver or layer (not from a server or our code)."""
    import psycopg
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, sqlite3.Error | psycopg.Error | SQLAlchemyError | StorageError)


def _transient(exc: BaseException) -> bool:
    """The database is down, restarting or busy: the same statement may work later."""
    if not isinstance(exc, TRANSIENT_DB_ERRORS):
        return False
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, sqlite3.OperationalError):
        # SQLite's OperationalError also covers a read-only or full database, which waiting
        # does not fix; only lock contention does.
        text = str(cause).lower()
        return "locked" in text or "busy" in text
    return True


def _where(exc: BaseException) -> str:
    """The innermost frame of an unexpected error, for a bug report."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    path = Path(f.filename)
    parts = path.parts
    shown = "/".join(parts[parts.index("qalign") :]) if "qalign" in parts else path.name
    return f" (at {shown}:{f.lineno} in {f.name})"


def _describe(exc: BaseException, stall_timeout: float) -> tuple[str, int | None]:
    """The text recorded for a failed attempt, and the attempts allowed (None: the run's)."""
    if isinstance(exc, PromptTooLongError):
        return str(exc), 1  # retrying cannot make the prompt shorter
    if isinstance(exc, StepStalledError):
        return (
            f"StepStalledError: the step took longer than execution.stall_timeout="
            f"{stall_timeout:g} s",
            None,
        )
    if isinstance(exc, ClientError | OSError | TimeoutError):
        return f"{type(exc).__name__}: {exc}", None
    return f"{type(exc).__name__}: {exc}{_where(exc)}", None


def _keys(spec: RunSpec) -> list[str]:
    out = []
    sections: list[GeneratorSpec | RewardSpec] = [spec.generator]
    if spec.reward is not None:
        sections += spec.reward.sections()
    for section in sections:
        try:
            key = api_key(section.api_key_env, section.api_key_file)
        except CredentialsError:
            continue
        if key:
            out.append(key)
    return out


def mask_secrets(text: str, secrets: list[str]) -> str:
    """`text` with every secret replaced by `***` (servers may echo a request's headers)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def step_params(
    chain: repo.ChainRow, rec: StepRecord, worker: str, queue_s: float = 0.0
) -> dict[str, Any]:
    """The SQL parameters of a step's commit (`repo.STEP_PARAMS`), straight from its record
    (`queue_s`: how long the step waited to start, see `StepService.take`)."""
    proposal = rec.proposal
    state: State = rec.state
    return {
        "chain_id": chain.chain_id,
        "run_id": chain.run_id,
        "step": rec.step,
        "cut": rec.cut,
        "new_tokens": rec.new_tokens,
        "response_len": len(proposal.tokens) if proposal else rec.cut + len(rec.new_tokens),
        "text": rec.proposal_text,
        "reward": proposal.reward if proposal else None,
        "log_a": rec.decision.log_a,
        "alpha": rec.decision.alpha,
        "accepted": rec.accepted,
        "finish": rec.finish.value,
        "reject_reason": rec.decision.reason.value if rec.decision.reason else None,
        "gen_seed": rec.gen_seed,
        "reward_tokens": rec.reward_tokens,
        "reward_terms": rec.reward_terms,
        "gen_latency_ms": rec.gen_latency_s * 1000.0,
        "reward_latency_ms": rec.reward_latency_s * 1000.0,
        "endpoint": rec.endpoint,
        "worker": worker,
        "state_tokens": state.tokens,
        "state_logprobs": state.logprobs,
        "state_reward": state.reward,
        "state_finish": state.finish.value,
        "state_text": rec.state_text,
        "generator_seconds": rec.generator_s,
        "reward_seconds": rec.reward_s,
        "queue_seconds": queue_s,
        "log_weight": rec.log_weight,
    }


@dataclass(frozen=True)
class _Proposed:
    record: StepRecord
    queue_s: float


@dataclass(frozen=True)
class _Loaded:
    chain: repo.ChainRow
    sweep_id: int
    spec: RunSpec
    messages: list[dict[str, Any]]
    prompt_ids: list[int] | None
    smc_start: Start | None = None  # SMC: where the particle starts this block (after block 0)


class StepService:
    """Takes steps of stored chains; one per process, shared by all its runners' drivers.

    Args:
        sessions: the database.
        worker: the name stored with every proposal this process commits.
        concurrency: steps of one sweep at the servers at once in this process; None takes each
            sweep's `execution.concurrency`.
        clients: the server clients (a new registry when None).
        db_threads: threads for blocking database calls (PostgreSQL; SQLite runs inline).
        metrics: where the steps are counted (a registry of the service's own when None).
    """

    def __init__(
        self,
        sessions: repo.Sessions,
        *,
        worker: str | None = None,
        concurrency: int | None = None,
        clients: ClientRegistry | None = None,
        db_threads: int = 32,
        metrics: StepMetrics | None = None,
    ) -> None:
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.sessions = sessions
        self.worker = worker or default_worker_name()
        self.concurrency = concurrency
        self.clients = clients or ClientRegistry()
        self.db_threads = db_threads
        self.metrics = metrics or StepMetrics()
        self._pool: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        bind = sessions.kw.get("bind")
        # A local SQLite read takes tens of microseconds, less than handing it to a thread and
        # back. Its commits go to one writer thread of their own (SQLite has a single writer).
        self._inline = getattr(getattr(bind, "dialect", None), "name", "") == "sqlite"
        self._writing = False  # SQLite: a batch of commits is at the writer thread
        self._specs: dict[int, tuple[float, int, RunSpec]] = {}
        self._limits: dict[int, tuple[int, asyncio.Semaphore]] = {}
        self._verdicts: dict[tuple[int, int, int], bool] = {}
        self._verdicts_lock = threading.Lock()  # filled from the database threads
        self._templating: dict[tuple[int, str], asyncio.Future[list[int]]] = {}
        self._saved: set[tuple[int, str]] = set()  # prompt encodings this process stored
        self._commits: list[tuple[dict[str, Any], asyncio.Future[int | None]]] = []

    # ---- database ----------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking database call off the event loop (SQLite: on it, see __init__)."""
        if self._inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)

    def _executor(self) -> ThreadPoolExecutor:
        """The threads for blocking database calls, started on first use."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.db_threads, thread_name_prefix="qalign-db")
        return self._pool

    def warm(self) -> None:
        """Start the database threads and make the first connection now (PostgreSQL), so
        the first burst of steps does not wait for them.

        Only one connection is opened here: the others open as steps need them, and several
        workers starting at once must not take the server's `max_connections` for idle ones.

        Raises the driver's error when the database cannot be reached.
        """
        bind = self.sessions.kw.get("bind")
        if self._inline or bind is None:
            return
        bind.raw_connection().close()  # also the dialect's one-time set-up on first connect
        start_threads(self._executor(), self.db_threads)

    def run_spec(self, run_id: int) -> tuple[int, RunSpec]:
        """(sweep id, settings) of a run, re-read from the database every `SPEC_TTL_S`."""
        now = time.monotonic()
        cached = self._specs.get(run_id)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        sweep_id, config = repo.run_settings(self.sessions, run_id)
        spec = RunSpec.from_config(config)
        self._specs[run_id] = (now + SPEC_TTL_S, sweep_id, spec)
        return sweep_id, spec

    def _load(self, chain_id: int, known: repo.ChainRow | None = None) -> _Loaded:
        chain = known if known is not None else repo.read_chain(self.sessions, chain_id)
        sweep_id, spec = self.run_spec(chain.run_id)
        return _Loaded(
            chain=chain,
            sweep_id=sweep_id,
            spec=spec,
            messages=repo.prompt_messages(self.sessions, chain.prompt_id),
            prompt_ids=repo.prompt_encoding(self.sessions, chain.prompt_id, spec.generator.model),
        )

    # ---- one step ----------------------------------------------------------------------------

    async def take(
        self,
        chain_id: int,
        step: int,
        ready_at: float | None = None,
        known: repo.ChainRow | None = None,
    ) -> Outcome:
        """Take step `step` of chain `chain_id` if it is the chain's next step; see module doc.

        Args:
            known: the chain as this process's commit of step `step` - 1 left it
                (`Outcome.row`), instead of reading it again. Safe even if the chain changed
                since: the commit is a compare-and-set on the stored chain.
            ready_at: when the step became runnable (`time.time()`: its hint was enqueued, its
                retry delay ran out, or the chain's previous step committed); the step's
                `queue_seconds` run from then to when it gets its `execution.concurrency` slot.
                None: from this call.

        Raises:
            ChainNotFoundError: there is no chain `chain_id`.
            DatabaseFailure: the database cannot be used (read-only, full, corrupt, ...).
        """
        ready = time.time() if ready_at is None else ready_at
        t_sql = time.perf_counter()
        try:
            loaded = await self.db(self._load, chain_id, known)
        except ChainNotFoundError:
            raise  # a hint about no chain of this database: the runner's business, not a step's
        except Exception as exc:
            if _database_error(exc):
                return self._database_trouble(chain_id, step, exc)
            raise
        sql_s = time.perf_counter() - t_sql
        chain, spec = loaded.chain, loaded.spec
        if (early := self._precheck(chain, step, spec)) is not None:
            return early
        wake: tuple[tuple[int, int], ...] = ()
        if spec.smc is not None and 0 < step <= chain.target_steps:
            try:
                gate, start, wake = await self.db(
                    smc_barrier, self.sessions, chain, step - 1, spec.smc.ess_threshold
                )
            except Exception as exc:
                if _database_error(exc):
                    return self._database_trouble(chain_id, step, exc)
                raise
            if gate is not None:
                return gate
            loaded = dataclasses.replace(loaded, smc_start=start)
        rule = spec.stop_when
        if rule is not None and 0 < step <= chain.target_steps and rule.is_checkpoint(step - 1):
            try:
                gate, wake = await self.db(self._checkpoint, chain, step - 1, rule)
            except Exception as exc:
                if _database_error(exc):
                    return self._database_trouble(chain_id, step, exc)
                raise
            if gate is not None:
                return gate
        out = await self._advance(loaded, step, ready, sql_s)
        return dataclasses.replace(out, wake=wake) if wake else out

    async def _advance(self, loaded: _Loaded, step: int, ready: float, sql_s: float) -> Outcome:
        """Propose step `step` and commit it (or record the failure).

        `ready` is when the step became runnable; `sql_s` the SQL seconds spent on it so far.
        """
        chain_id, chain = loaded.chain.chain_id, loaded.chain
        try:
            proposed = await self._propose(loaded, step, ready)
        except Exception as exc:
            if _database_error(exc):
                return self._database_trouble(chain_id, step, exc)
            return await self._failed(loaded, step, exc)
        rec = proposed.record
        t_sql = time.perf_counter()
        params = step_params(chain, rec, self.worker, proposed.queue_s)
        try:
            target = await self._commit_together(params)
        except Exception as exc:
            if _database_error(exc):
                return self._database_trouble(chain_id, step, exc)
            return await self._failed(loaded, step, exc)
        if target is None:
            return Outcome(chain_id, step, Result.DUPLICATE, run_id=chain.run_id)
        sql_s += time.perf_counter() - t_sql
        self.metrics.step_committed(rec.generator_s, rec.reward_s, sql_s)
        # The commit read the stored target: a `qalign sweep extend` made since the chain was
        # read counts (the commit itself left the chain `running` then).
        done = step >= target
        status = ChainStatus.DONE.value if done else ChainStatus.RUNNING.value
        return Outcome(
            chain_id,
            step,
            Result.COMMITTED,
            next_step=None if done else step + 1,
            chain_status=status,
            run_id=chain.run_id,
            # the chain as this commit left it: the driver's next step need not read it back
            row=repo.committed_row(chain, step, target, rec.state, rec.state_text),
        )

    async def _commit_together(self, params: dict[str, Any]) -> int | None:
        """`repo.commit_step` of `params`, together with every other step that reached its
        commit in the same turn of the event loop (`repo.commit_steps`: on SQLite one
        transaction, on PostgreSQL one connection and one database-thread hand-off)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int | None] = loop.create_future()
        self._commits.append((params, done))
        if len(self._commits) == 1:
            loop.call_soon(self._flush_commits)
        return await done

    def _flush_commits(self) -> None:
        # SQLite: while the writer thread commits a batch, steps reaching their commit wait
        # and go together in the next one (bigger batches, each SQLite commit shared by more
        # steps); the sqlite3 module lets go of the GIL while SQLite works, so the event loop
        # goes on meanwhile. PostgreSQL: batches run on the database threads side by side.
        if self._writing or not self._commits:
            return
        batch, self._commits = self._commits, []
        rows = [p for p, _ in batch]
        loop = asyncio.get_running_loop()
        if self._inline:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="qalign-writer")
            self._writing = True
        pool = self._writer if self._inline else self._executor()
        running = loop.run_in_executor(pool, repo.commit_steps, self.sessions, rows)

        def settle(f: asyncio.Future[list[int | None]]) -> None:
            if self._inline:
                self._writing = False
                if self._commits:
                    loop.call_soon(self._flush_commits)
            if f.cancelled():  # the loop is going away: so are the drivers waiting here
                for _, done in batch:
                    done.cancel()
                return
            exc = f.exception()
            self._settle(batch, exc if exc is not None else f.result())

        running.add_done_callback(settle)

    @staticmethod
    def _settle(
        batch: list[tuple[dict[str, Any], asyncio.Future[int | None]]],
        outcome: list[int | None] | BaseException,
    ) -> None:
        for i, (_, done) in enumerate(batch):
            if done.done():  # a cancelled driver: its step is committed all the same
                continue
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)  # every step of the batch meets it, as alone
            else:
                done.set_result(outcome[i])

    def _checkpoint(
        self, chain: repo.ChainRow, at: int, rule: StopRule
    ) -> tuple[Outcome | None, tuple[tuple[int, int], ...]]:
        """`stop_when` before step `at` + 1 of a chain at checkpoint `at` (see core.stopping).

        Returns an outcome when the chain does not go on (it waits for a sibling still before
        the checkpoint, or its prompt converged and it retired), else None and the siblings
        waiting at the checkpoint that this chain releases.
        """
        cid, run_id, prompt_id = chain.chain_id, chain.run_id, chain.prompt_id
        sibs = repo.prompt_chains(self.sessions, run_id, prompt_id)
        converged = ChainStatus.CONVERGED.value
        if any(s.status == converged for s in sibs):
            return self._retire(chain, at), ()
        if any(s.current_step > at for s in sibs):
            return None, ()  # a sibling went past: the verdict here was "go on"
        behind = [s for s in sibs if s.current_step < at]
        if any(s.status not in repo.FINAL for s in behind):
            return Outcome(cid, at + 1, Result.WAITING, chain_status=chain.status,
                           run_id=run_id), ()  # fmt: skip
        if behind:
            return None, ()  # a sibling failed or was cancelled before the checkpoint: no verdict
        key = (run_id, prompt_id, at)
        with self._verdicts_lock:
            done = self._verdicts.get(key)
        if done is None:
            ids = [s.chain_id for s in sibs]
            rewards, lengths = state_traces(repo.state_rows(self.sessions, ids, at), at)
            complete = len(rewards) == len(ids) and all(len(t) == at + 1 for t in rewards)
            done = complete and verdict(rewards, lengths, rule).converged
            with self._verdicts_lock:
                if len(self._verdicts) >= VERDICTS_KEPT:
                    self._verdicts.pop(next(iter(self._verdicts)))
                self._verdicts[key] = done
        if done:
            return self._retire(chain, at), ()
        wake = tuple(
            (s.chain_id, at + 1)
            for s in sibs
            if s.chain_id != cid and s.current_step == at and s.status not in repo.FINAL
        )
        return None, wake

    def _retire(self, chain: repo.ChainRow, at: int) -> Outcome:
        moved = repo.retire_converged(self.sessions, chain.run_id, chain.prompt_id, at)
        if moved:
            log.info("run %d prompt %d: chains converged at step %d; %d retired",
                     chain.run_id, chain.prompt_id, at, moved)  # fmt: skip
        return Outcome(chain.chain_id, at + 1, Result.CONVERGED,
                       chain_status=ChainStatus.CONVERGED.value, run_id=chain.run_id)  # fmt: skip

    def _released_by_failure(
        self, chain: repo.ChainRow, rule: StopRule
    ) -> tuple[tuple[int, int], ...]:
        """Siblings that may wait at a checkpoint for a chain that just failed for good."""
        sibs = repo.prompt_chains(self.sessions, chain.run_id, chain.prompt_id)
        return tuple(
            (s.chain_id, s.current_step + 1)
            for s in sibs
            if s.chain_id != chain.chain_id
            and s.status not in repo.FINAL
            and rule.is_checkpoint(s.current_step)
        )

    def _precheck(self, chain: repo.ChainRow, step: int, spec: RunSpec) -> Outcome | None:
        """The outcome when step `step` is not this chain's next step, else None.

        A message for a step already taken is normally a duplicate whose twin drives the chain
        on. But when the chain has sat untouched for the run's `stall_timeout`, whoever took
        that step died before handing the chain on (e.g. a worker killed after its commit), so
        the duplicate's `next_step` invites the caller to adopt the chain. Two adopters cannot
        both commit a step; the loser sees a freshly moved chain at its next step and stops.
        """
        cid, run_id = chain.chain_id, chain.run_id
        if chain.status in repo.FINAL:
            return Outcome(cid, step, Result.SKIPPED, chain_status=chain.status, run_id=run_id)
        if chain.current_step >= step:
            idle = (dt.datetime.now(dt.UTC) - chain.updated_at).total_seconds()
            adopt = chain.current_step + 1 if idle >= spec.execution.stall_timeout else None
            if adopt is not None and chain.current_step >= chain.target_steps:
                adopt = None
            return Outcome(
                cid, step, Result.DUPLICATE, next_step=adopt, chain_status=chain.status,
                run_id=run_id,
            )  # fmt: skip
        if chain.current_step < step - 1:
            return Outcome(cid, step, Result.SKIPPED, chain_status=chain.status, run_id=run_id)
        return None

    def _limit(self, sweep_id: int, spec: RunSpec) -> asyncio.Semaphore:
        size = self.concurrency or spec.execution.concurrency
        found = self._limits.get(sweep_id)
        if found is None or found[0] != size:
            # A changed `execution.concurrency` takes effect for new steps; steps holding the
            # old semaphore finish under it.
            found = self._limits[sweep_id] = (size, asyncio.Semaphore(size))
        return found[1]

    async def _propose(self, loaded: _Loaded, step: int, ready_at: float) -> _Proposed:
        """Talk to the servers for step `step`: the record to commit and its queue wait."""
        spec = loaded.spec
        async with self._limit(loaded.sweep_id, spec):
            # Clamped: a Celery hint's enqueue time comes from another host's clock.
            queue_s = max(0.0, time.time() - ready_at)
            deadline = asyncio.timeout(spec.execution.stall_timeout)
            try:
                async with deadline:
                    return _Proposed(await self._sample(loaded, step), queue_s)
            except TimeoutError as exc:
                if deadline.expired():
                    raise StepStalledError(str(exc)) from exc
                raise

    async def _sample(self, loaded: _Loaded, step: int) -> StepRecord:
        chain, spec = loaded.chain, loaded.spec
        if step == 0 and chain.state is not None:
            # A warm-started chain: its initial state was copied from another sweep's chain
            # when the sweep was created. Step 0 records it; no server is asked anything.
            return warm_start_step(chain.state, chain.state_text or "")
        gen = await self.clients.generator(spec.generator)
        rm = await self.clients.reward(spec.reward) if spec.reward is not None else None
        prompt_ids = loaded.prompt_ids
        if prompt_ids is None:
            prompt_ids = await self._template(chain.prompt_id, gen, loaded.messages)
            prompt_ids = check_prompt_length(prompt_ids, spec.max_prompt_length)
            key = (chain.prompt_id, gen.model)
            if key not in self._saved:  # a prompt's chains all start at once: store it once
                self._saved.add(key)
                await self.db(repo.save_encoding, self.sessions, *key, prompt_ids)
        chain_spec = ChainSpec(
            key=chain.rng_key,
            seed=chain.seed,
            prompt_ids=tuple(prompt_ids),
            messages=loaded.messages,
            kernel=spec.kernel,
            sampling=spec.sampling,
        )
        if spec.smc is not None and rm is not None:
            return await smc_block(
                chain_spec, loaded.smc_start, step, spec.smc.block_tokens, gen, rm
            )
        if step == 0:
            return await initial_step(chain_spec, gen, rm)
        if chain.state is None or (rm is None and spec.kernel.needs_reward):
            raise RuntimeError(
                f"chain {chain.chain_id} has no state or reward model before step {step}"
            )
        return await mcmc_step(chain_spec, chain.state, chain.state_text or "", step, gen, rm)

    async def _template(self, prompt_id: int, gen: Generator, messages: Conversation) -> list[int]:
        """The generator's templated ids of a prompt, asked once however many of its chains
        start together (before the encoding is stored, each would ask)."""
        key = (prompt_id, gen.model)
        task = self._templating.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(gen.chat_prompt(messages))
            self._templating[key] = task

            def forget(done: asyncio.Future[list[int]]) -> None:
                # in flight only: a failure is asked again by the next attempt
                if self._templating.get(key) is done:
                    del self._templating[key]
                if not done.cancelled():
                    done.exception()  # retrieved here even if every waiter was cancelled

            task.add_done_callback(forget)
        return list(await asyncio.shield(task))

    async def _failed(self, loaded: _Loaded, step: int, exc: BaseException) -> Outcome:
        """Record a failed attempt against this chain only."""
        chain, spec = loaded.chain, loaded.spec
        message, allowed = _describe(exc, spec.execution.stall_timeout)
        message = mask_secrets(message, _keys(spec))
        max_attempts = allowed or spec.execution.max_attempts
        log.warning("chain %d step %d failed: %s", chain.chain_id, step, message)
        log.debug("chain %d step %d failure", chain.chain_id, step, exc_info=exc)
        wake: tuple[tuple[int, int], ...] = ()
        try:
            status, attempts = await self.db(
                repo.record_failure, self.sessions, chain.chain_id, step, message, max_attempts
            )
            if status == ChainStatus.FAILED.value and spec.stop_when is not None:
                wake = await self.db(self._released_by_failure, chain, spec.stop_when)
            elif status == ChainStatus.FAILED.value and spec.smc is not None:
                wake = await self.db(smc_released, self.sessions, chain)
        except Exception as db_exc:
            if _database_error(db_exc):
                return self._database_trouble(chain.chain_id, step, db_exc)
            raise
        self.metrics.step_failed(repo.error_kind(message))  # the kind its step_errors row has
        return Outcome(
            chain.chain_id,
            step,
            Result.FAILED,
            chain_status=status,
            attempts=attempts,
            error=message,
            run_id=chain.run_id,
            wake=wake,
        )

    def _database_trouble(self, chain_id: int, step: int, exc: BaseException) -> Outcome:
        if _transient(exc):
            first = (str(exc).splitlines() or [""])[0][:200]
            log.warning(
                "chain %s step %s: database unavailable (%s: %s); retrying later",
                chain_id, step, type(exc).__name__, first,
            )  # fmt: skip
            self.metrics.step_failed(DATABASE_UNAVAILABLE)
            return Outcome(chain_id, step, Result.DEFERRED, error=f"{type(exc).__name__}: {first}")
        if isinstance(exc, DatabaseFailure):
            raise exc
        if (file_error := _sqlite_file_error(exc, self.sessions)) is not None:
            # Corrupt, read-only, full: fatal for the whole run, and the message already says
            # which file and what to do. Raw pooled connections (`hotpath`) bypass the
            # engine's error hook, hence the second look here.
            raise DatabaseFailure(str(file_error)) from exc
        raise DatabaseFailure(_database_message(exc, self.sessions)) from exc

    async def close(self) -> None:
        await self.clients.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._writer is not None:
            self._writer.shutdown(wait=False)
            self._writer = None


def _sqlite_file_error(exc: BaseException, sessions: repo.Sessions) -> SQLiteFileError | None:
    from qalign.storage.engine import sqlite_path

    bind = sessions.kw.get("bind")
    if bind is None or bind.dialect.name != "sqlite":
        return None
    return sqlite_file_error(exc, sqlite_path(bind.url))


def _database_message(exc: BaseException, sessions: repo.Sessions) -> str:
    from qalign.storage.engine import redact_url

    bind = sessions.kw.get("bind")
    where = redact_url(bind.url) if bind is not None else "the database"
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).splitlines() or [""])[0][:300]
    return f"cannot use {where}: {first} ({type(cause).__name__})"
