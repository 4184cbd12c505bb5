"""The two ways to run a sweep, behind one interface, for tests that must hold on both paths.

`LocalRunner` is `qalign run` (SQLite, no broker); `CeleryRunner` is `qalign sweep create` +
`qalign sweep run` served by a long-lived `qalign worker` (PostgreSQL, Redis). Both return when
every chain of the sweep has settled (done, failed or converged), and both give SQLAlchemy
sessions on their database for the checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.models import Chain, Run, Sweep
from tests.sweeps_support import Broker, Worker, cli, write_config

SETTLED = ("done", "failed", "converged")


@dataclass
class Outcome:
    """What running a sweep printed (the exit code is `qalign run`'s, 0 for Celery)."""

    returncode: int
    stdout: str
    stderr: str


class LocalRunner:
    name = "local"

    def __init__(self, db_url: str, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.env = env or {}
        self.sessions = make_sessionmaker(make_engine(db_url))

    def run(self, cfg: dict[str, Any], *flags: str, env: dict[str, str] | None = None) -> Outcome:
        path = write_config(self.tmp, cfg)
        out = cli(
            "run", str(path), "--database", self.db_url, "--quiet", *flags,
            env={**self.env, **(env or {})},
        )  # fmt: skip
        return Outcome(out.returncode, out.stdout, out.stderr)


class CeleryRunner:
    name = "celery"

    def __init__(
        self,
        db_url: str,
        tmp: Path,
        broker: Broker,
        worker: Worker,
        env: dict[str, str] | None = None,
    ) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.broker = broker
        self.worker = worker
        self.env = env or {}  # for `sweep create`, which contacts the servers
        self.sessions = make_sessionmaker(make_engine(db_url))

    def run(
        self,
        cfg: dict[str, Any],
        *flags: str,
        env: dict[str, str] | None = None,
        timeout: float = 240.0,
    ) -> Outcome:
        path = write_config(self.tmp, cfg)
        created = cli(
            "sweep", "create", str(path), "--database", self.db_url, *flags,
            env={**self.env, **(env or {})},
        )  # fmt: skip
        if created.returncode != 0:
            return Outcome(created.returncode, created.stdout, created.stderr)
        started = cli("sweep", "run", cfg["name"], "--database", self.db_url, env=self.broker.env())
        assert started.returncode == 0, started.stderr
        self.wait_settled(cfg["name"], timeout)
        return Outcome(0, created.stdout + started.stdout, created.stderr + started.stderr)

    def wait_settled(self, sweep: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.worker.proc.poll() is None, self.worker.output()[-4000:]
            statuses = chain_statuses(self.sessions, sweep)
            if statuses and all(s in SETTLED for s in statuses):
                return
            assert time.monotonic() < deadline, (sweep, statuses, self.worker.output()[-4000:])
            time.sleep(0.2)


def chain_statuses(sessions: Any, sweep: str) -> list[str]:
    with sessions() as s:
        return list(
            s.execute(
                select(Chain.status)
                .join(Run, Run.id == Chain.run_id)
                .join(Sweep, Sweep.id == Run.sweep_id)
                .where(Sweep.name == sweep)
            ).scalars()
        )
