"""Shared helpers for sweep tests: toy servers, configs, workers, and whole-sweep invariants."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import yaml
from sqlalchemy import select

from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.models import Chain, Proposal, Run, SmcAncestry, SmcResample, Sweep
from qalign.storage.replay import replay

ROOT = Path(__file__).resolve().parents[1]
QALIGN = [sys.executable, "-m", "qalign.cli"]


def sweep_config(
    name: str,
    gen_url: str,
    rm_url: str,
    *,
    prompts: int = 8,
    beta: Any = (0.5, 1.0),
    steps: int = 10,
    chains: int = 2,
    max_new_tokens: int = 3,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "method": "qalign",
        "generator": {"urls": [gen_url], "model": "toy-lm", "timeout": 30, "max_retries": 4},
        "reward": {"urls": [rm_url], "model": "toy-rm", "format": "vllm", "timeout": 30},
        "dataset": {"prompts": [f"question {i}: yes or no?" for i in range(prompts)]},
        "beta": list(beta) if isinstance(beta, list | tuple) else beta,
        "steps": steps,
        "chains_per_prompt": chains,
        "seed": 11,
        "max_new_tokens": max_new_tokens,
        "max_prompt_length": 64,
        **extra,
    }


def write_config(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Broker:
    """A Redis database + queue name on `server`, a redis-server the caller started for itself
    (the session's `redis_server`, or a test's own `PrivateRedis`); never the shared 6379 one.
    Without `db` a random one of 1..15 is used."""

    def __init__(self, server: str, db: int | None = None) -> None:
        self.db = 1 + uuid.uuid4().int % 15 if db is None else db
        self.url = f"{server}/{self.db}"
        self.queue = f"qalign-test-{uuid.uuid4().hex[:8]}"
        self.redis = redis.Redis.from_url(self.url)

    def env(self) -> dict[str, str]:
        return {"QALIGN_BROKER_URL": self.url, "QALIGN_QUEUE": self.queue}

    def flush(self) -> None:
        """Empty this broker's queue and Celery's unacked bookkeeping (in its own database)."""
        self.redis.delete(self.queue, "unacked", "unacked_index")

    def queued(self) -> int:
        return int(self.redis.llen(self.queue))

    def dispatcher(self) -> Any:
        """A dispatcher publishing on this broker's queue, as a scheduler would."""
        from qalign.dispatch.celery import BrokerSettings, CeleryDispatcher, celery_app

        return CeleryDispatcher(celery_app(BrokerSettings(url=self.url, queue=self.queue)))


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QALIGN, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


class Worker:
    """A `qalign worker` subprocess in its own process group."""

    def __init__(
        self,
        name: str,
        db_url: str,
        broker: Broker,
        concurrency: int = 16,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        log_dir: Path | None = None,  # default: the temp dir (the session's, under pytest)
    ) -> None:
        self.name = name
        self.log = (
            log_dir or Path(tempfile.gettempdir())
        ) / f"qalign-{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc = subprocess.Popen(
            [
                *QALIGN,
                "worker",
                "--database",
                db_url,
                "--concurrency",
                str(concurrency),
                "--name",
                name,
                "--loglevel",
                "INFO",
                *args,
            ],
            env={**os.environ, **broker.env(), **(env or {})},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stacks(self, timeout: float = 30.0) -> str:
        """The worker's thread stacks (`kill -USR1`: Celery's handler logs them), for a test
        that found it stuck: the end of its log once the dump has appeared there."""
        if self.proc.poll() is not None:
            return f"{self.name}: exited {self.proc.returncode}\n{self.output()[-4000:]}"
        before = self.output().count("LOCAL VARIABLES")
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self.output().count("LOCAL VARIABLES") <= before:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # the dump is written thread by thread
        return f"{self.name}:\n{self.output()[-60000:]}"


@contextmanager
def workers(*items: Worker) -> Iterator[tuple[Worker, ...]]:
    try:
        yield items
    finally:
        for w in items:
            w.kill(signal.SIGTERM if w.proc.poll() is None else signal.SIGKILL)


def wait_done(db_url: str, expected_chains: int, timeout: float = 300.0) -> None:
    """Wait until `expected_chains` chains are done. The default is wide for a loaded machine
    and still well under pytest's 600 s per test."""
    sessions = make_sessionmaker(make_engine(db_url))
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        with sessions() as s:
            done = len(s.execute(select(Chain.id).where(Chain.status == "done")).all())
        if done >= expected_chains:
            return
        time.sleep(0.5)
    raise AssertionError(f"only {done}/{expected_chains} chains finished in {timeout:.0f}s")


def steps_committed(db_url: str) -> int:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions() as s:
        return len(s.execute(select(Proposal.id)).all())


def check_invariants(db_url: str) -> dict[int, tuple[int, ...]]:
    """Every chain has exactly one proposal per step 0..N and its state is the replay's state.

    Returns each chain's final state tokens.
    """
    sessions = make_sessionmaker(make_engine(db_url))
    finals: dict[int, tuple[int, ...]] = {}
    with sessions() as s:
        chains = s.execute(select(Chain)).scalars().all()
        rows = s.execute(
            select(
                Proposal.chain_id,
                Proposal.step,
                Proposal.cut,
                Proposal.new_tokens,
                Proposal.accepted,
                Proposal.reward,
                Proposal.reward_tokens,
                Proposal.gen_tokens,
            )
        ).all()
    by_chain: dict[int, list[tuple[int, int, list[int], bool]]] = {}
    for cid, step, cut, new, acc, reward, rm_tokens, gen_tokens in rows:
        by_chain.setdefault(cid, []).append((step, cut, new, acc))
        assert gen_tokens == len(new) > 0
        if reward is not None:
            assert rm_tokens is not None and rm_tokens > 0
    for c in chains:
        assert c.status == "done", (c.id, c.status, c.last_error)
        props = by_chain.get(c.id, [])
        assert sorted(p[0] for p in props) == list(range(c.target_steps + 1)), c.id
        walked = replay(props)
        assert walked[-1].state == tuple(c.state_tokens), c.id
        assert c.current_step == c.target_steps
        accepted = sum(1 for step, _, _, acc in props if step > 0 and acc)
        assert c.accepted_steps == accepted, (c.id, c.accepted_steps, accepted)  # status counter
        finals[c.id] = tuple(c.state_tokens)
    return finals


def smc_rows(db_url: str, sweep: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row an SMC sweep stored, keyed by its particles' `rng_key`s (stable across sweeps
    and databases, unlike ids): proposals with their log weights, the resampling barriers, the
    ancestry, and each chain's final status and state. Two runs of one config with one seed
    must give equal dicts however often they were interrupted."""
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions() as s:
        runs = select(Run.id).join(Sweep, Sweep.id == Run.sweep_id).where(Sweep.name == sweep)
        chains = s.execute(select(Chain).where(Chain.run_id.in_(runs))).scalars().all()
        key = {c.id: c.rng_key for c in chains}
        # a prompt's barrier by its key: the chains' "grid/prompt" (see repo.create_sweep)
        prompt = {(c.run_id, c.prompt_id): c.rng_key.rsplit("/", 1)[0] for c in chains}
        proposals = sorted(
            (key[p.chain_id], p.step, p.cut, tuple(p.new_tokens), p.response_len, p.text,
             p.reward, p.log_weight, p.accepted, p.finish, p.gen_seed)
            for p in s.execute(select(Proposal).where(Proposal.chain_id.in_(key))).scalars()
        )  # fmt: skip
        barriers = sorted(
            (prompt[(r.run_id, r.prompt_id)], r.block, r.particles, r.ess, r.resampled, r.u)
            for r in s.execute(select(SmcResample).where(SmcResample.run_id.in_(runs))).scalars()
        )  # fmt: skip
        ancestry = sorted(
            (key[a.chain_id], a.block, key[a.parent_chain_id], a.log_weight,
             tuple(a.state_tokens), a.state_reward, a.state_finish, a.state_text)
            for a in s.execute(select(SmcAncestry).where(SmcAncestry.run_id.in_(runs))).scalars()
        )  # fmt: skip
        finals = sorted(
            (c.rng_key, c.status, c.current_step, c.target_steps, tuple(c.state_tokens or ()),
             c.state_reward, c.state_finish, c.state_text)
            for c in chains
        )  # fmt: skip
    return {"proposals": proposals, "barriers": barriers, "ancestry": ancestry, "chains": finals}


def smc_complete(rows: dict[str, list[tuple[Any, ...]]]) -> None:
    """Nothing lost, nothing twice: one proposal per (particle, block), one barrier per
    (prompt, block) but the last, one ancestry row per (particle, block) after the first."""
    finals = rows["chains"]
    assert finals and all(c[1] == "done" for c in finals), [c[:3] for c in finals]
    blocks = {c[0]: c[3] + 1 for c in finals}
    steps = [(p[0], p[1]) for p in rows["proposals"]]
    assert steps == sorted((k, t) for k, n in blocks.items() for t in range(n))
    prompts = {k.rsplit("/", 1)[0]: n for k, n in blocks.items()}
    assert [(b[0], b[1]) for b in rows["barriers"]] == sorted(
        (p, t) for p, n in prompts.items() for t in range(n - 1)
    )
    assert [(a[0], a[1]) for a in rows["ancestry"]] == sorted(
        (k, t) for k, n in blocks.items() for t in range(1, n)
    )


def run_sweep_locally(sessions: Any, sweep_id: int) -> None:
    """Run a sweep to its end with `qalign run`'s runner and a fresh step service."""
    import asyncio

    from qalign.scheduler.local import run_locally
    from qalign.steps.service import StepService

    async def go() -> None:
        service = StepService(sessions)
        try:
            await run_locally(service, sweep_id, progress=False)
        finally:
            await service.close()

    asyncio.run(go())
