"""SMC sweeps survive crashes: a SIGKILLed `qalign run` or Celery worker mid-sweep, resumed,
stores exactly the rows (blocks with their log weights, barriers, ancestry, final states) of an
uninterrupted run of the same config and seed, and nothing committed before the kill is redone.

A gate in front of the toy generator passes the first generations and holds the rest, so the
kill, sent once the database shows committed blocks and a resampling row, always lands mid-sweep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import upgrade
from qalign.storage.models import Chain, Proposal, SmcResample
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.stub_servers import Gate, proxy_app, serve_in_background
from tests.sweeps_support import (
    QALIGN,
    ROOT,
    Broker,
    Worker,
    cli,
    smc_complete,
    smc_rows,
    sweep_config,
    wait_done,
    workers,
    write_config,
)

PROMPTS, PARTICLES, TOKENS = 3, 6, 4  # 3 barriers per prompt; at most 72 generations
CHAINS = PROMPTS * PARTICLES
# Every block 0 and one prompt's worth of block 1, then the gate. Not every pass becomes a block:
# a barrier's winner may wake a sibling that was about to go on by itself, and the second of the
# two drivers' generations then commits nothing (a duplicate), so the wait below counts blocks
# past the first ones, not passes.
ALLOWED = CHAINS + PARTICLES


def smc_config(name: str, gen: str, rm: str) -> dict[str, Any]:
    cfg = sweep_config(name, gen, rm, prompts=PROMPTS, beta=0.5, chains=PARTICLES,
                       max_new_tokens=TOKENS)  # fmt: skip
    cfg.pop("steps")
    cfg["generator"]["timeout"] = 300  # requests held at the gate wait for it, not a retry
    return {**cfg, "method": "smc", "smc": {"block_tokens": 1, "ess_threshold": 0.7}}


@pytest.fixture
def servers() -> Iterator[tuple[str, str]]:
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        yield g.url, r.url


def progress(db_url: str) -> tuple[int, int]:
    """(blocks committed, resampling barriers run) in the database so far."""
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions() as s:
        blocks = int(s.execute(select(func.count(Proposal.id))).scalar() or 0)
        barriers = int(s.execute(select(func.count()).select_from(SmcResample)).scalar() or 0)
    return blocks, barriers


def committed(db_url: str) -> dict[tuple[str, int], tuple[int, Any]]:
    """(particle key, block) -> (proposal id, commit time): a block redone would change both."""
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions() as s:
        rows = s.execute(
            select(Chain.rng_key, Proposal.step, Proposal.id, Proposal.created_at).join(
                Chain, Chain.id == Proposal.chain_id
            )
        ).all()
    return {(k, step): (pid, at) for k, step, pid, at in rows}


def wait_mid_sweep(db_url: str, gate: Gate, alive: Any, output: Any, stuck: Any = None) -> None:
    """Until some blocks after the first are committed, a barrier ran and a generation is held
    at the gate: the sweep is mid-step (observed, not timed). `stuck()` says what the runners
    are doing when that never happens (default: `output()`)."""
    deadline = time.monotonic() + 300  # wide for a loaded machine, under pytest's 600 s
    while True:
        blocks, barriers = progress(db_url)
        if blocks > CHAINS and barriers >= 1 and gate.held >= 1:
            return
        assert alive(), output()
        if time.monotonic() >= deadline:
            seen = f"{blocks} blocks, {barriers} barriers, gate: {gate.passed} in, {gate.held} held"
            pytest.fail(f"the sweep stopped short ({seen}):\n{(stuck or output)()}")
        time.sleep(0.1)


def test_a_sigkilled_local_run_resumes_to_the_rows_of_an_uninterrupted_one(
    servers: tuple[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    gen, rm = servers
    upgrade(sqlite_url)  # the schema before the run, for `progress` to poll
    gate = Gate(allow=ALLOWED)
    with serve_in_background(proxy_app(gen, gate=gate)) as gated:
        path = write_config(tmp_path, smc_config("killed", gated, rm))
        log = (tmp_path / "run.log").open("w")
        proc = subprocess.Popen(
            [*QALIGN, "run", str(path), "--database", sqlite_url, "--quiet"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            output = (tmp_path / "run.log").read_text
            wait_mid_sweep(sqlite_url, gate, lambda: proc.poll() is None, output)
            os.killpg(proc.pid, signal.SIGKILL)  # mid-step: requests are held at the gate
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            log.close()
            gate.open()
        before = committed(sqlite_url)
        assert CHAINS < len(before) < CHAINS * TOKENS
        out = cli("run", str(path), "--database", sqlite_url, "--quiet")
        assert out.returncode == 0 and "resuming sweep 'killed'" in out.stderr, out.stderr
    after = committed(sqlite_url)
    assert {k: after[k] for k in before} == before  # nothing committed before the kill redone
    fresh = write_config(tmp_path, smc_config("whole", gen, rm))
    assert cli("run", str(fresh), "--database", sqlite_url, "--quiet").returncode == 0
    resumed, whole = smc_rows(sqlite_url, "killed"), smc_rows(sqlite_url, "whole")
    smc_complete(resumed)
    assert resumed == whole
    assert any(b[4] for b in whole["barriers"])  # some barrier resampled, not only passed


def test_sigkilled_celery_workers_mid_smc_sweep_resume_to_the_same_rows(
    servers: tuple[str, str], pg_url: str, tmp_path: Path, broker: Broker
) -> None:
    """Both workers SIGKILLed mid-step; a new worker and `qalign sweep resume` finish the sweep
    (the killed workers' unacknowledged messages stay lost in the broker's bookkeeping)."""
    gen, rm = servers
    upgrade(pg_url)
    gate = Gate(allow=ALLOWED)
    with serve_in_background(proxy_app(gen, gate=gate)) as gated, contextlib.ExitStack() as stack:
        path = write_config(tmp_path, smc_config("killed", gated, rm))
        created = cli("sweep", "create", str(path), "--database", pg_url)
        assert created.returncode == 0, created.stderr
        victims = [
            Worker(f"victim{i}@host", pg_url, broker, concurrency=4, log_dir=tmp_path)
            for i in (1, 2)
        ]
        stack.enter_context(workers(*victims))
        stack.callback(gate.open)  # on the way out first: a warm shutdown waits for held requests
        sent = cli("sweep", "run", "killed", "--database", pg_url, env=broker.env())
        assert sent.returncode == 0, sent.stderr
        wait_mid_sweep(
            pg_url,
            gate,
            lambda: all(v.proc.poll() is None for v in victims),
            lambda: "\n".join(v.output()[-2000:] for v in victims),
            lambda: "\n".join(v.stacks() for v in victims),
        )
        for v in victims:
            v.kill(signal.SIGKILL)
        before = committed(pg_url)
        assert CHAINS < len(before) < CHAINS * TOKENS
        gate.open()
        rescuer = Worker("rescuer@host", pg_url, broker, concurrency=4, log_dir=tmp_path)
        stack.enter_context(workers(rescuer))
        out = cli("sweep", "resume", "killed", "--database", pg_url, env=broker.env())
        assert out.returncode == 0, out.stderr
        wait_done(pg_url, CHAINS)
        after = committed(pg_url)
        assert {k: after[k] for k in before} == before
        fresh = write_config(tmp_path, smc_config("whole", gen, rm))
        assert cli("sweep", "create", str(fresh), "--database", pg_url).returncode == 0
        sent = cli("sweep", "run", "whole", "--database", pg_url, env=broker.env())
        assert sent.returncode == 0, sent.stderr
        wait_done(pg_url, 2 * CHAINS)
    resumed, whole = smc_rows(pg_url, "killed"), smc_rows(pg_url, "whole")
    smc_complete(resumed)
    assert resumed == whole
