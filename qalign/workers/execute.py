"""`advance`: take one step of one stored chain. Celery tasks and `qalign run` both call it.

Reads the chain in one short transaction, talks to the servers with no transaction open, then
commits the proposal and the chain's new state in a second transaction guarded by a
compare-and-set on the chain's step. A duplicated, replayed or concurrent delivery of the same
(chain, step) therefore adds nothing and moves nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from qalign.clients import HttpSettings, make_generator, make_reward
from qalign.clients.base import Generator, RewardModel, SamplingParams
from qalign.clients.cache import CachedReward
from qalign.clients.errors import ClientError, CredentialsError, PromptTooLongError
from qalign.core import KernelConfig, Method, index_distribution
from qalign.sampling.step import ChainSpec, StepRecord, initial_step, mcmc_step
from qalign.storage import repo
from qalign.storage.models import ChainStatus

log = logging.getLogger(__name__)
T = TypeVar("T")


class Result(StrEnum):
    COMMITTED = "committed"  # this call took the step
    DUPLICATE = "duplicate"  # the step was already taken (redelivery, concurrent twin)
    SKIPPED = "skipped"  # chain finished, cancelled, or the message is stale
    FAILED = "failed"  # the servers failed; the failure is recorded on the chain


@dataclass(frozen=True)
class Outcome:
    chain_id: int
    step: int
    result: Result
    next_step: int | None = None  # enqueue this step next
    chain_status: str | None = None
    error: str | None = None


class ClientCache:
    """One started client per distinct server config, shared by every step of the process."""

    def __init__(self, startup_timeout: float = 600.0) -> None:
        self.startup_timeout = startup_timeout
        self._items: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _get(self, kind: str, cfg: dict[str, Any], build: Callable[[], Any]) -> Any:
        key = kind + json.dumps(cfg, sort_keys=True)
        if key in self._items:
            return self._items[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._items:
                client = build()
                await client.start()
                self._items[key] = client
        return self._items[key]

    async def generator(self, cfg: dict[str, Any]) -> Generator:
        def build() -> Generator:
            return make_generator(
                cfg["backend"],
                cfg["urls"],
                cfg["model"],
                settings=_settings(cfg),
                startup_timeout=self.startup_timeout,
                vocab_size=cfg.get("vocab_size"),
            )

        client: Generator = await self._get("gen", cfg, build)
        return client

    async def reward(self, cfg: dict[str, Any]) -> RewardModel:
        def build() -> RewardModel:
            return CachedReward(
                make_reward(
                    cfg["format"],
                    cfg["urls"],
                    cfg["model"],
                    settings=_settings(cfg),
                    batch_size=cfg["batch_size"],
                    startup_timeout=self.startup_timeout,
                )
            )

        client: RewardModel = await self._get("rm", cfg, build)
        return client

    async def close(self) -> None:
        for client in self._items.values():
            await client.close()
        self._items.clear()


def api_key(cfg: dict[str, Any]) -> str | None:
    """The API key of a generator or reward section, from `api_key_env` or `api_key_file`.

    The key itself is never stored in the config, the database or any message.
    """
    import os

    env = cfg.get("api_key_env")
    path = cfg.get("api_key_file")
    if env:
        value = os.environ.get(env)
        if value is None or not value.strip():
            raise CredentialsError(
                f"api_key_env names ${env}, which is not set (or empty) in this process; "
                "export it where `qalign run` / `qalign worker` runs"
            )
        return value.strip()
    if path:
        file = Path(path).expanduser()
        try:
            value = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            )
            raise CredentialsError(f"cannot read api_key_file {str(file)!r}: {reason}") from None
        if not value.strip():
            raise CredentialsError(f"api_key_file {str(file)!r} is empty")
        return value.strip()
    return None


def _settings(cfg: dict[str, Any]) -> HttpSettings:
    """Transport settings of a generator or reward section (API key from env or file)."""
    return HttpSettings(
        total_timeout=cfg["timeout"], max_retries=cfg["max_retries"], api_key=api_key(cfg)
    )


@dataclass
class Services:
    """What `advance` needs: the database, a thread pool for it, and the server clients."""

    sessions: repo.Sessions
    db_threads: int = 32
    clients: ClientCache = field(default_factory=ClientCache)
    _pool: ThreadPoolExecutor | None = None
    _inline: bool | None = None

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking database call off the event loop (SQLite: on it, see below)."""
        if self._inline is None:
            bind = self.sessions.kw.get("bind")
            self._inline = getattr(getattr(bind, "dialect", None), "name", "") == "sqlite"
        if self._inline:
            # A local SQLite call takes tens of microseconds, less than handing it to a thread
            # and back; and SQLite has a single writer anyway.
            return fn(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.db_threads, thread_name_prefix="qalign-db")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        await self.clients.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def kernel_of(run_config: dict[str, Any]) -> KernelConfig:
    method = run_config["method"]
    return KernelConfig(
        beta=run_config["beta"] if run_config["beta"] is not None else 1.0,
        max_new_tokens=run_config["max_new_tokens"],
        method=Method.QUEST if method == "quest" else Method.QALIGN,
        index=index_distribution(run_config["index"]),
        clamp=run_config["clamp"],
    )


def worker_name() -> str:
    """Who took a step: the Celery node name when set, else host and process id."""
    import os
    import socket

    return os.environ.get("QALIGN_WORKER_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def _write(rec: StepRecord) -> repo.StepWrite:
    proposal = rec.proposal
    return repo.StepWrite(
        step=rec.step,
        cut=rec.cut,
        new_tokens=rec.new_tokens,
        response_len=len(proposal.tokens) if proposal else rec.cut + len(rec.new_tokens),
        text=rec.proposal_text,
        reward=proposal.reward if proposal else None,
        log_a=rec.decision.log_a,
        alpha=rec.decision.alpha,
        accepted=rec.accepted,
        finish=rec.finish.value,
        reject_reason=rec.decision.reason.value if rec.decision.reason else None,
        gen_seed=rec.gen_seed,
        reward_tokens=rec.reward_tokens,
        gen_latency_ms=rec.gen_latency_s * 1000.0,
        reward_latency_ms=rec.reward_latency_s * 1000.0,
        endpoint=rec.endpoint,
        state=rec.state,
        state_text=rec.state_text,
        worker=worker_name(),
    )


ADOPT_AFTER_S = 300.0  # see `_precheck`


def _precheck(ctx: repo.StepContext, step: int) -> Outcome | None:
    """The outcome when step `step` is not this chain's next step, else None.

    A message for a step already taken is normally a duplicate whose twin drives the chain on.
    But when the chain has sat untouched for `ADOPT_AFTER_S` seconds, whoever took that step
    died before handing the chain on (e.g. a worker killed after its commit), so the duplicate's
    `next_step` invites the caller to adopt the chain. Two adopters cannot both commit a step;
    the loser sees a freshly moved chain at its next step and stops.
    """
    if ctx.status in repo.FINAL:
        return Outcome(ctx.chain_id, step, Result.SKIPPED, chain_status=ctx.status)
    if ctx.current_step >= step:
        idle = (dt.datetime.now(dt.UTC) - ctx.updated_at).total_seconds()
        adopt = ctx.current_step + 1 if idle >= ADOPT_AFTER_S else None
        return Outcome(
            ctx.chain_id, step, Result.DUPLICATE, next_step=adopt, chain_status=ctx.status
        )
    if ctx.current_step < step - 1:
        return Outcome(ctx.chain_id, step, Result.SKIPPED, chain_status=ctx.status)
    return None


async def _propose(
    services: Services, ctx: repo.StepContext, step: int, max_attempts: int
) -> StepRecord | Outcome:
    """Talk to the servers for step `step`: the record to commit, or the recorded failure."""
    chain_id = ctx.chain_id
    cfg = ctx.run_config
    try:
        gen = await services.clients.generator(cfg["generator"])
        rm = await services.clients.reward(cfg["reward"]) if cfg.get("reward") else None
        prompt_ids = ctx.prompt_ids
        if prompt_ids is None:
            prompt_ids = await gen.chat_prompt(ctx.messages)
            if len(prompt_ids) > cfg["max_prompt_length"]:
                raise PromptTooLongError(
                    f"the templated prompt is {len(prompt_ids)} tokens, over max_prompt_length="
                    f"{cfg['max_prompt_length']}; raise it in the config or drop this prompt"
                )
            await services.db(
                repo.save_encoding, services.sessions, ctx.prompt_id, gen.model, prompt_ids
            )
        spec = ChainSpec(
            key=ctx.rng_key,
            seed=ctx.seed,
            prompt_ids=tuple(prompt_ids),
            messages=ctx.messages,
            kernel=kernel_of(cfg),
            sampling=SamplingParams(temperature=cfg["temperature"]),
        )
        if step == 0:
            return await initial_step(spec, gen, rm)
        if ctx.state is None or rm is None:
            raise RuntimeError(f"chain {chain_id} has no state or reward model before step {step}")
        return await mcmc_step(spec, ctx.state, ctx.state_text or "", step, gen, rm)
    except PromptTooLongError as exc:
        status = await services.db(
            repo.record_failure, services.sessions, chain_id, step, str(exc), 1
        )
        return Outcome(chain_id, step, Result.FAILED, chain_status=status, error=str(exc))
    except (ClientError, OSError, TimeoutError) as exc:
        msg = f"{type(exc).__name__}: {exc}"
        log.warning("chain %d step %d failed: %s", chain_id, step, msg)
        status = await services.db(
            repo.record_failure, services.sessions, chain_id, step, msg, max_attempts
        )
        return Outcome(chain_id, step, Result.FAILED, chain_status=status, error=msg)


def _committed(ctx: repo.StepContext, step: int, committed: bool) -> Outcome:
    if not committed:
        return Outcome(ctx.chain_id, step, Result.DUPLICATE)
    done = step >= ctx.target_steps
    return Outcome(
        ctx.chain_id,
        step,
        Result.COMMITTED,
        next_step=None if done else step + 1,
        chain_status=ChainStatus.DONE.value if done else ChainStatus.RUNNING.value,
    )


async def advance(services: Services, chain_id: int, step: int, *, max_attempts: int) -> Outcome:
    """Take step `step` of chain `chain_id` if it is the chain's next step; see module doc."""
    ctx = await services.db(repo.load_step_context, services.sessions, chain_id)
    if (early := _precheck(ctx, step)) is not None:
        return early
    rec = await _propose(services, ctx, step, max_attempts)
    if isinstance(rec, Outcome):
        return rec
    return _committed(
        ctx, step, await services.db(repo.commit_step, services.sessions, ctx, _write(rec))
    )


def advance_blocking(services: Services, chain_id: int, step: int, *, max_attempts: int) -> Outcome:
    """`advance` for a caller with its own thread (a Celery task): the SQL runs on that thread.

    Saves the two hand-offs to the database thread pool per step; the server calls still run
    on the process's event loop.
    """
    from qalign.sampling.loop import run_sync

    ctx = repo.load_step_context(services.sessions, chain_id)
    if (early := _precheck(ctx, step)) is not None:
        return early
    rec = run_sync(_propose(services, ctx, step, max_attempts))
    if isinstance(rec, Outcome):
        return rec
    return _committed(ctx, step, repo.commit_step(services.sessions, ctx, _write(rec)))
