"""Workers survive Redis restarts: they reconnect and keep working, and no step is lost or doubled.

Runs its own `redis-server` on a free port (killed and restarted, never the shared one). The
sweep is small enough that the workers are never saturated: each has tasks in flight while its
BRPOP is outstanding, which is when kombu used to stop a worker on a broker restart
(`AttributeError: 'NoneType' object has no attribute 'hostname'`, see
`qalign.workers.consumer`).
"""

from __future__ import annotations

import signal
import time

import pytest

from benchmarks.chaos import PrivateRedis
from qalign.storage.migrate import upgrade
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.sweeps_support import (
    Broker,
    Worker,
    check_invariants,
    cli,
    steps_committed,
    sweep_config,
    wait_done,
    workers,
    write_config,
)

RESTARTS = 4
CHAINS, STEPS = 8, 40


@pytest.mark.timeout(540)
def test_workers_survive_redis_restarts_and_the_sweep_stays_exact(pg_url, tmp_path):
    rd = PrivateRedis(log=tmp_path / "redis.log")
    rd.start()
    gen = ToyServerOptions(served_model_names=("toy-lm",), port=0, latency_base=0.15)
    try:
        with (
            serve_in_thread(gen) as g,
            serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
        ):
            broker = Broker(rd.url)
            upgrade(pg_url)
            cfg = sweep_config("restarts", g.url, r.url, prompts=1, beta=1.0, steps=STEPS)
            cfg["chains_per_prompt"] = CHAINS
            path = write_config(tmp_path, cfg)
            assert cli("sweep", "create", str(path), "--database", pg_url).returncode == 0
            crew = tuple(Worker(f"survivor{i}@host", pg_url, broker, concurrency=6) for i in (1, 2))
            with workers(*crew):
                out = cli("sweep", "run", "restarts", "--database", pg_url, env=broker.env())
                assert out.returncode == 0, out.stderr
                for n in range(RESTARTS):
                    before = steps_committed(pg_url)
                    # Progress observed before each restart: the workers are mid-sweep when
                    # Redis goes (a loaded machine may take a while to make 10 steps).
                    deadline = time.monotonic() + 60
                    while steps_committed(pg_url) < before + 10 and time.monotonic() < deadline:
                        time.sleep(0.1)
                    rd.kill()  # `--save ""`: the queue and the unacked messages are lost
                    time.sleep(0.5)
                    rd.start()
                    resumed = cli("sweep", "resume", "restarts", "--database", pg_url,
                                  env=broker.env())  # fmt: skip
                    assert resumed.returncode == 0, resumed.stderr
                    time.sleep(2.0)  # long enough for every worker to reconnect (or die)
                    for w in crew:
                        assert w.proc.poll() is None, (n, w.name, w.output()[-4000:])
                wait_done(pg_url, CHAINS, timeout=300)
                for w in crew:
                    assert w.proc.poll() is None, (w.name, w.output()[-4000:])
                    assert "Connection to broker lost" in w.output()  # it did see the restarts
                for w in crew:
                    w.kill(signal.SIGTERM)
                    assert w.proc.returncode == 0, w.output()[-2000:]  # warm shutdown
    finally:
        rd.kill()
    check_invariants(pg_url)  # one proposal per (chain, step), states match their replay
