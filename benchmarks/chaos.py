"""Chaos run (issue 6, item 1): a distributed sweep survives killed workers, broker and database
restarts and misbehaving servers, and still samples exactly.

Everything runs on private instances, never the shared services: a PostgreSQL cluster
(initdb'd into a temporary directory, run as the `postgres` user when we are root) and a
`redis-server` on free ports, and the toy generator and reward servers on free ports with their
fault switches flipped at runtime through `POST /admin/faults`. Two or more `qalign worker`
processes run the sweep while a driver, at random points of the sweep's progress, SIGKILLs
workers (and starts replacements), kills and restarts Redis (`--save ""`: every queued message
is lost), restarts PostgreSQL (immediate or fast shutdown), makes the generator answer 503 or
hang for a while, and makes the reward server answer malformed JSON or NaN for a while. A reaper
thread re-enqueues stalled chains every few seconds, as `qalign sweep reap --every` would.

At the end it checks: every chain is done; exactly one proposal per (chain, step), none missing;
every chain's state is its last accepted proposal (by replay); the failed attempts are recorded
with reasons and shown by `qalign sweep status`; NaN answers rejected at most one proposal each;
and the final states match the exact k-step law within the sampling bound (chains that received
a NaN reward are left out: a NaN rejection is a different, still target-invariant, kernel).

With `--method smc` the sweep is an SMC one (issue 13: many prompts, each a group of particles
that meet at a resampling barrier after every block) and the run has no NaN windows (a NaN reward
changes a particle's weight, so the run could not equal a crash-free one). Instead of the
exact-law check it verifies that every particle-block is stored once, every barrier ran exactly
once with one ancestry row per particle, and that every stored row (blocks and their log weights,
barriers, ancestry, final states) equals those of a crash-free in-process run of the same config
and seed against fresh toy servers (their sampling is seeded, so the faults cannot show).

Run: `.venv/bin/python benchmarks/chaos.py` (full: 20 SIGKILLs, ~5 min on 2 cores) or
`--short` (the CI form, as in tests/test_chaos.py), each with `--method smc` for the SMC sweep.
Prints a Markdown summary; `--record` appends it to benchmarks/RESULTS.md under "Chaos run".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from qalign.config import parse_config  # noqa: E402
from qalign.core import KernelConfig  # noqa: E402
from qalign.sampling.smc import FINISHED_ENDPOINT  # noqa: E402
from qalign.scheduler.local import run_locally  # noqa: E402
from qalign.scheduler.sweeps import create_sweep, reap  # noqa: E402
from qalign.steps.service import StepService  # noqa: E402
from qalign.storage.engine import make_engine, make_sessionmaker  # noqa: E402
from qalign.storage.migrate import upgrade  # noqa: E402
from qalign.storage.models import Chain, ChainStatus, Proposal, StepError  # noqa: E402
from qalign.toy.exact import (  # noqa: E402
    empirical,
    step_distribution,
    total_variation,
    transition_matrix,
    tv_bound,
)
from qalign.toy.model import ToyModel  # noqa: E402
from qalign.toy.server import ToyServerOptions, serve_in_thread  # noqa: E402
from tests.sweeps_support import (  # noqa: E402
    Broker,
    Worker,
    check_invariants,
    cli,
    smc_complete,
    smc_rows,
    sweep_config,
    write_config,
)

KINDS = ("kill", "redis", "postgres", "gen503", "hang", "malformed", "nan")
WINDOW_CAP = 60.0  # seconds a fault window may outlast its length while waiting for a request


@dataclass(frozen=True)
class Plan:
    """What to run and which faults to inject (counts per kind)."""

    chains: int = 500
    steps: int = 6  # smc: blocks of one token (max_new_tokens = steps)
    method: str = "qalign"  # or "smc": `chains` particles over `prompts` prompts
    prompts: int = 1
    workers: int = 3
    concurrency: int = 6
    kill: int = 20
    redis: int = 3
    postgres: int = 3
    gen503: int = 2
    hang: int = 2
    malformed: int = 2
    nan: int = 2
    gen_latency: float = 0.6  # seconds per generation: paces the sweep so the faults fit in it
    spacing: float = 2.5  # minimum seconds between two faults
    window: float = 3.0  # seconds a server fault (503, hang, malformed, NaN) lasts
    nan_rate: float = 0.2  # share of reward answers that are NaN during a NaN window
    reap_every: float = 4.0
    # above the longest a healthy chain waits in the queue (chains / throughput), else the
    # reaper floods the queue with (harmless) duplicate hints
    stall_timeout: float = 45.0
    max_attempts: int = 8
    deadline: float = 900.0
    seed: int = 0


FULL = Plan()
SHORT = replace(
    FULL,
    chains=200,
    workers=2,
    concurrency=6,
    kill=3,
    redis=1,
    postgres=1,
    gen503=1,
    hang=1,
    malformed=1,
    nan=1,
    gen_latency=0.15,
    spacing=3.0,
    stall_timeout=15.0,
    deadline=240.0,
)
# SMC: no NaN window (see the module doc). The short form has 20 prompts x 8 particles x 4
# blocks (60 barriers); its generator is slower than SHORT's so that the faults, spaced by
# committed steps, all land before its 640 blocks (many of them no-ops) are done.
SMC_FULL = replace(FULL, method="smc", prompts=50, chains=400, steps=4, nan=0, gen_latency=1.0)
SMC_SHORT = replace(SHORT, method="smc", prompts=20, chains=160, steps=4, nan=0, gen_latency=0.4)


@dataclass
class Report:
    """What happened and what was checked."""

    plan: Plan
    injected: Counter[str] = field(default_factory=Counter)
    server_faults: dict[str, dict[str, int]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    steps_expected: int = 0
    steps_committed: int = 0
    duplicates: int = 0
    missing: int = 0
    step_errors: dict[str, int] = field(default_factory=dict)
    db_handbacks: int = 0
    redundant_deliveries: int = 0
    broker_reconnects: int = 0
    reaped: int = 0
    reap_failures: int = 0
    revived: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    sequences_generated: int = 0
    reward_requests: int = 0
    nan_rejections: int = 0
    exact_chains: int = 0
    barrier_waits: int = 0  # smc: steps that waited at a barrier for a sibling (no effect)
    barriers: int = 0  # smc: resampling barriers stored
    finished_blocks: int = 0  # smc: blocks of a finished particle (committed, nothing generated)
    same_as_crash_free: bool | None = None  # smc: every stored row equals a crash-free run's
    tv: float = float("nan")
    tv_limit: float = float("nan")
    status_output: str = ""
    graceful_exits: list[int] = field(default_factory=list)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        p = self.plan
        gen, rm = self.server_faults.get("gen", {}), self.server_faults.get("rm", {})
        redone = self.sequences_generated - (self.steps_committed - self.finished_blocks)
        errors = ", ".join(f"{k} {v}" for k, v in self.step_errors.items()) or "none"
        rows = [
            ("worker processes SIGKILLed (each replaced at once)", f"{self.injected['kill']}"),
            ("Redis killed and restarted (queue and unacked lost)", f"{self.injected['redis']}"),
            ("PostgreSQL restarted (immediate / fast shutdown)", f"{self.injected['postgres']}"),
            (
                f"generator 503 windows (≥ {p.window:.0f} s, until a step attempt failed)",
                f"{self.injected['gen503']} ({gen.get('error', 0)} requests answered 503)",
            ),
            (
                "generator hang windows (30 % of requests hang 8 s)",
                f"{self.injected['hang']} ({gen.get('hang', 0)} requests hung)",
            ),
            (
                "reward malformed-JSON windows (50 % of answers)",
                f"{self.injected['malformed']} ({rm.get('malformed', 0)} bodies cut short)",
            ),
            (
                f"reward NaN windows ({p.nan_rate:.0%} of answers)",
                f"{self.injected['nan']} ({rm.get('nan', 0)} NaN answers)",
            ),
            ("reward-model inputs scored (the workers cache rewards)", f"{self.reward_requests}"),
            ("steps committed / expected", f"{self.steps_committed} / {self.steps_expected}"),
            ("duplicate (chain, step) proposals", f"{self.duplicates}"),
            ("**steps lost** (missing (chain, step))", f"**{self.missing}**"),
            ("failed step attempts recorded and retried (by reason)", errors),
            ("steps handed back to the broker during DB outages", f"{self.db_handbacks}"),
            ("redundant deliveries (duplicate/stale, no effect)", f"{self.redundant_deliveries}"),
            ("worker broker reconnects", f"{self.broker_reconnects}"),
            ("chains re-enqueued by the reaper", f"{self.reaped}"),
            ("chains revived by `resume --retry-failed`", f"{self.revived}"),
            (
                "generations served / steps redone or abandoned",
                f"{self.sequences_generated} / {redone}",
            ),
            ("proposals rejected for a NaN reward (≤ NaN answers)", f"{self.nan_rejections}"),
            ("unexpected worker exits", f"{len(self.unexpected_exits)}"),
            ("workers' exit codes after SIGTERM (warm shutdown)", f"{self.graceful_exits}"),
            *self._exactness(),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        if p.method == "smc":
            sweep = (
                f"SMC: {p.prompts} prompts x {p.chains // p.prompts} particles x {p.steps} blocks"
            )
        else:
            sweep = f"{p.chains} chains x {p.steps} steps"
        head = (
            f"{sweep}, {p.workers} workers x {p.concurrency} threads, PostgreSQL + Redis: "
            f"{'PASS' if self.ok else 'FAIL'}"
        )
        lines = [head, "", "| | |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in rows]
        lines += [f"\nFAILED: {f}" for f in self.failures]
        return "\n".join(lines)

    def _exactness(self) -> list[tuple[str, str]]:
        p = self.plan
        if p.method == "smc":
            same = {True: "yes", False: "**no**", None: "not compared"}[self.same_as_crash_free]
            return [
                (
                    "resampling barriers stored (one per prompt and block but the last)",
                    f"{self.barriers} / {p.prompts * (p.steps - 1)}",
                ),
                ("steps that waited at a barrier for a sibling", f"{self.barrier_waits}"),
                ("every stored row equals a crash-free run's (same seed)", same),
            ]
        return [
            (
                f"exactness: TV of {self.exact_chains} final states to the exact "
                f"{p.steps}-step law",
                f"{self.tv:.4f} < bound {self.tv_limit:.4f}",
            )
        ]


# ---- private services ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; the cluster belongs to the `postgres` user then.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on its own port (never the shared 5432 server)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(bins[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="qalign-chaos-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout}")

    def start(self) -> None:
        # fsync and full-page writes only protect against an OS crash; a killed server loses
        # nothing without them. synchronous_commit stays on: an immediate shutdown must not lose
        # a commit a worker was told had happened.
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "log"),
                "-w",
                "-o",
                opts,
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A `redis-server` subprocess without persistence on its own port."""

    def __init__(self, log: Path | None = None, databases: int = 16) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        # Test sessions ask for many databases so that every test gets a fresh one.
        self.databases = databases
        self.proc: subprocess.Popen[bytes] | None = None
        # Tests pass a file under their tmp_path; the benchmark keeps its log in the temp dir.
        self.log = log or Path(tempfile.mkstemp(prefix="qalign-chaos-redis-", suffix=".log")[1])

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--databases",
                str(self.databases),
            ],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start; see {self.log}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def injected(url: str) -> dict[str, int]:
    """How many faults of each kind the toy server at `url` has served so far."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/admin/faults", timeout=10) as resp:
        out: dict[str, int] = json.loads(resp.read())["injected"]
        return out


def set_faults(url: str, **changes: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/admin/faults",
        data=json.dumps(changes).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


# ---- the run -------------------------------------------------------------------------------


class Reaper(threading.Thread):
    """`qalign sweep reap --every S` in a thread; failures while a service is down are counted."""

    def __init__(self, sessions: Any, broker: Broker, plan: Plan, report: Report) -> None:
        super().__init__(name="chaos-reaper", daemon=True)
        self.dispatcher = broker.dispatcher()
        self.sessions, self.plan, self.report = sessions, plan, report
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.plan.reap_every):
            try:
                # each sweep's own execution.stall_timeout, as `qalign sweep reap` does
                self.report.reaped += reap(self.sessions, self.dispatcher, None)
            except Exception as exc:  # a service is down right now: count it, try next round
                self.report.reap_failures += 1
                self.report.events.append(f"reap failed: {type(exc).__name__}")


@contextlib.contextmanager
def services() -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    pg = PrivatePostgres()
    rd = PrivateRedis()
    try:
        pg.start()
        rd.start()
        yield pg, rd
    except BaseException:
        rd.kill()
        print(f"redis log kept for inspection: {rd.log}", file=sys.stderr)
        raise
    else:
        rd.kill()
        rd.log.unlink(missing_ok=True)  # a clean run leaves nothing in the temp folder
    finally:
        pg.destroy()


def _step_errors(sessions: Any) -> int:
    """Failed step attempts recorded so far (-1 while the database is unreachable)."""
    try:
        return _count(sessions, select(func.count()).select_from(StepError))
    except SQLAlchemyError:
        return -1


def _count(sessions: Any, stmt: Any) -> int:
    with sessions() as s:
        return int(s.execute(stmt).scalar() or 0)


def run(plan: Plan, log: Any = print) -> Report:
    """Run the chaos plan end to end and check every guarantee; never raises on a failed check."""
    report = Report(plan)
    rng = random.Random(plan.seed)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="qalign-chaos-"))
    gen_opts = ToyServerOptions(
        served_model_names=("toy-lm",), port=0, latency_base=plan.gen_latency, fault_seed=1
    )
    rm_opts = ToyServerOptions(served_model_names=("toy-rm",), port=0, fault_seed=2)
    with services() as (pg, rd), serve_in_thread(gen_opts) as gen, serve_in_thread(rm_opts) as rm:
        broker = Broker(rd.url)
        db = pg.url
        upgrade(db)
        sessions = make_sessionmaker(make_engine(db, pool_size=4))
        cfg = chaos_config(plan, gen.url, rm.url)
        path = write_config(tmp, cfg)
        out = cli("sweep", "create", str(path), "--database", db, env=broker.env())
        if out.returncode != 0:
            raise RuntimeError(f"sweep create failed: {out.stderr}")
        report.steps_expected = plan.chains * (plan.steps + (plan.method != "smc"))

        serial = 0
        alive: list[Worker] = []
        dead: list[Worker] = []

        def spawn() -> Worker:
            nonlocal serial
            serial += 1
            w = Worker(
                f"chaos{serial}@host",
                db,
                broker,
                concurrency=plan.concurrency,
                env={"QALIGN_DB_POOL_SIZE": str(plan.concurrency + 2)},
            )
            alive.append(w)
            return w

        for _ in range(plan.workers):
            spawn()
        out = cli("sweep", "run", "chaos", "--database", db, env=broker.env())
        if out.returncode != 0:
            raise RuntimeError(f"sweep run failed: {out.stderr}")
        reaper = Reaper(sessions, broker, plan, report)
        reaper.start()

        todo = [k for k in KINDS for _ in range(getattr(plan, k))]
        rng.shuffle(todo)
        marks = sorted(rng.uniform(0.04, 0.8) * report.steps_expected for _ in todo)
        # (ends at, url, reset, fault counter, its value when the window opened, and for 503
        # windows the step_errors rows then)
        windows: list[tuple[float, str, dict[str, float], str, int, int | None]] = []
        last_event = 0.0
        committed = 0
        done = 0
        idle_since: float | None = None
        try:
            while time.monotonic() - start < plan.deadline:
                time.sleep(0.25)
                now = time.monotonic()
                for window in list(windows):
                    end, url, reset, key, before, errors_before = window
                    # A window closes only once the server has served at least one fault of its
                    # kind: on a loaded machine a few seconds can pass with no request at all
                    # (workers restarting, every request of the moment hung), and a window that
                    # injected nothing proves nothing. A 503 window also waits for a failed step
                    # attempt: the client's own retries can absorb a few 503s. The cap keeps a
                    # dead path from stalling.
                    if now >= end and (
                        now >= end + WINDOW_CAP
                        or (
                            injected(url).get(key, 0) > before
                            and (errors_before is None or _step_errors(sessions) > errors_before)
                        )
                    ):
                        set_faults(url, **reset)
                        windows.remove(window)
                for w in list(alive):
                    if w.proc.poll() is not None:  # exited although nobody killed it
                        alive.remove(w)
                        dead.append(w)
                        tail = w.output()[-600:]
                        report.unexpected_exits.append(
                            f"{w.name} rc={w.proc.returncode} (log kept: {w.log}): {tail}"
                        )
                        log(f"worker {w.name} exited unexpectedly; replacing it")
                        spawn()
                try:
                    committed = _count(sessions, select(func.count()).select_from(Proposal))
                    done = _count(
                        sessions,
                        select(func.count())
                        .select_from(Chain)
                        .where(Chain.status == ChainStatus.DONE.value),
                    )
                    failed = _count(
                        sessions,
                        select(func.count())
                        .select_from(Chain)
                        .where(Chain.status == ChainStatus.FAILED.value),
                    )
                except SQLAlchemyError:
                    continue  # PostgreSQL is restarting
                if todo and committed >= marks[0] and now - last_event >= plan.spacing:
                    kind = todo.pop()
                    marks.pop(0)
                    last_event = now
                    report.injected[kind] += 1
                    msg = _inject(kind, rng, plan, alive, dead, spawn, rd, pg, gen.url, rm.url)
                    if msg.get("window"):
                        errors_before = _step_errors(sessions) if kind == "gen503" else None
                        windows.append(
                            (now + plan.window, msg["url"], msg["reset"], msg["key"],
                             msg["before"], errors_before)
                        )  # fmt: skip
                    line = f"{now - start:6.1f}s {committed:>5} steps: {kind} {msg.get('what', '')}"
                    report.events.append(line)
                    log(line)
                if done == plan.chains and not todo:
                    break
                if done + failed == plan.chains and failed:
                    # operator recovery for chains that ran out of attempts during an outage
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since > 2.0:
                        out = cli(
                            "sweep", "resume", "chaos", "--retry-failed", "--database", db,
                            env=broker.env(),
                        )  # fmt: skip
                        report.revived += failed
                        log(f"revived {failed} failed chain(s): {out.stdout.strip()}")
                        idle_since = None
                else:
                    idle_since = None
            else:
                report.failures.append(
                    f"deadline: {done}/{plan.chains} chains done after {plan.deadline:.0f} s"
                )
            if todo:
                report.failures.append(f"the sweep ended before {len(todo)} fault(s) were injected")
            for url in (gen.url, rm.url):
                set_faults(url, error_rate=0, hang_rate=0, malformed_rate=0, nan_rate=0)
        finally:
            reaper.stop.set()
            for w in alive:  # warm shutdown: in-flight steps finish or go back to the broker
                if w.proc.poll() is None:
                    os.killpg(w.proc.pid, signal.SIGTERM)
            for w in alive:
                try:
                    report.graceful_exits.append(w.proc.wait(timeout=60))
                except subprocess.TimeoutExpired:
                    w.kill()
                    report.failures.append(f"{w.name} did not exit within 60 s of SIGTERM")
            reaper.join(timeout=60)
        report.server_faults = {
            "gen": gen.metrics()["faults"],
            "rm": rm.metrics()["faults"],
        }
        report.sequences_generated = int(gen.metrics()["sequences"])
        report.reward_requests = int(rm.metrics()["scored_inputs"])
        _logs(report, [*alive, *dead])
        if plan.method == "smc":
            _verify_smc(report, db, cfg, tmp)
        else:
            _verify(report, db, sessions, broker)
        _verify_common(report, db, sessions, broker)
        kept = " ".join(report.unexpected_exits)
        for w in [*alive, *dead]:
            if str(w.log) not in kept:  # keep the logs of workers that died on their own
                with contextlib.suppress(OSError):
                    w.log.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.monotonic() - start
    return report


def _inject(
    kind: str,
    rng: random.Random,
    plan: Plan,
    alive: list[Worker],
    dead: list[Worker],
    spawn: Any,
    rd: PrivateRedis,
    pg: PrivatePostgres,
    gen_url: str,
    rm_url: str,
) -> dict[str, Any]:
    if kind == "kill":
        victim = rng.choice(alive)
        victim.kill(signal.SIGKILL)
        alive.remove(victim)
        dead.append(victim)
        spawn()
        return {"what": victim.name}
    if kind == "redis":
        rd.kill()
        time.sleep(1.0)
        rd.start()
        return {"what": "down 1 s"}
    if kind == "postgres":
        mode = rng.choice(("immediate", "fast"))
        pg.stop(mode)
        time.sleep(1.0)
        pg.start()
        return {"what": f"{mode}, down 1 s"}
    windows = {
        # kind: (server, switches while open, the server's counter of that fault)
        "gen503": (gen_url, {"error_rate": 1.0}, "error"),
        "hang": (gen_url, {"hang_rate": 0.3, "hang_seconds": 8.0}, "hang"),
        "malformed": (rm_url, {"malformed_rate": 0.5}, "malformed"),
        "nan": (rm_url, {"nan_rate": plan.nan_rate}, "nan"),
    }
    if kind in windows:
        url, switches, key = windows[kind]
        before = set_faults(url, **switches)["injected"].get(key, 0)
        rate = next(name for name in switches if name.endswith("_rate"))
        return {"window": True, "url": url, "key": key, "before": before, "reset": {rate: 0.0}}
    raise ValueError(f"unknown fault kind {kind!r}")


def _logs(report: Report, workers: list[Worker]) -> None:
    text = "\n".join(w.output() for w in workers)
    report.db_handbacks = len(re.findall(r"database unavailable", text))
    report.redundant_deliveries = len(re.findall(r"step \d+: (?:duplicate|skipped)", text))
    report.barrier_waits = len(re.findall(r"step \d+: waiting", text))
    report.broker_reconnects = len(re.findall(r"Connection to broker lost", text))


def chaos_config(plan: Plan, gen_url: str, rm_url: str) -> dict[str, Any]:
    """The sweep the chaos run creates: one prompt of many chains, or SMC prompts of particles."""
    if plan.method == "smc":
        particles = plan.chains // plan.prompts
        cfg = sweep_config("chaos", gen_url, rm_url, prompts=plan.prompts, beta=1.0,
                           chains=particles, max_new_tokens=plan.steps)  # fmt: skip
        cfg.pop("steps")
        cfg.update(method="smc", smc={"block_tokens": 1, "ess_threshold": 0.7})
    else:
        cfg = sweep_config(
            "chaos", gen_url, rm_url, prompts=1, beta=1.0, steps=plan.steps, chains=plan.chains
        )
        cfg["dataset"] = {"prompts": ["Answer yes or no."]}
    cfg["generator"].update(timeout=2.0, max_retries=4)
    cfg["reward"].update(timeout=2.0, max_retries=4)
    cfg["execution"] = {"max_attempts": plan.max_attempts, "stall_timeout": plan.stall_timeout}
    return cfg


def _verify_common(report: Report, db: str, sessions: Any, broker: Broker) -> None:
    """Nothing lost or doubled, the faults were served and every failed attempt is shown."""
    fail = report.failures.append
    plan = report.plan
    with sessions() as s:
        report.steps_committed = int(s.execute(select(func.count(Proposal.id))).scalar() or 0)
        dupes = s.execute(
            select(Proposal.chain_id, Proposal.step)
            .group_by(Proposal.chain_id, Proposal.step)
            .having(func.count() > 1)
        ).all()
        pairs = int(
            s.execute(
                select(func.count()).select_from(
                    select(Proposal.chain_id, Proposal.step).distinct().subquery()
                )
            ).scalar()
            or 0
        )
        report.step_errors = dict(
            s.execute(
                select(StepError.kind, func.count())
                .group_by(StepError.kind)
                .order_by(func.count().desc())
            ).all()
        )
    report.duplicates = len(dupes)
    report.missing = report.steps_expected - pairs
    if report.duplicates or report.missing:
        fail(f"{report.duplicates} duplicate and {report.missing} missing (chain, step)")
    if report.unexpected_exits:
        fail(f"workers exited on their own: {report.unexpected_exits}")
    if any(code != 0 for code in report.graceful_exits):
        fail(f"a worker's warm shutdown exited non-zero: {report.graceful_exits}")
    served = {
        "gen503": report.server_faults.get("gen", {}).get("error", 0),
        "hang": report.server_faults.get("gen", {}).get("hang", 0),
        "malformed": report.server_faults.get("rm", {}).get("malformed", 0),
        "nan": report.server_faults.get("rm", {}).get("nan", 0),
    }
    for kind, n in served.items():
        if report.injected[kind] and not n:
            fail(f"{kind} windows ran but the server injected no such fault")
    if report.nan_rejections > served["nan"]:
        fail(f"{report.nan_rejections} NaN rejections but only {served['nan']} NaN answers")
    if plan.gen503 and not report.step_errors:
        fail("503 windows ran but no failed step attempt was recorded")
    status = cli("sweep", "status", "chaos", "--database", db, env=broker.env())
    report.status_output = status.stdout
    if status.returncode != 0 or "failed step attempts" not in status.stdout:
        fail(f"`sweep status` shows no recorded errors: {status.stdout}{status.stderr}")
    else:
        for kind in report.step_errors:
            if kind not in status.stdout:
                fail(f"`sweep status` does not show the error kind {kind}")


def _verify(report: Report, db: str, sessions: Any, broker: Broker) -> None:
    """QAlign chains: each state is its replay, and the final states follow the exact law."""
    fail = report.failures.append
    plan = report.plan
    try:
        finals = check_invariants(db)
    except AssertionError as exc:
        fail(f"invariants: {exc}")
        finals = {}
    with sessions() as s:
        nan_hit = set(
            s.execute(
                select(Proposal.chain_id).where(
                    (Proposal.reject_reason == "non_finite_reward")
                    | ((Proposal.step == 0) & Proposal.reward.is_(None))
                )
            ).scalars()
        )
        report.nan_rejections = int(
            s.execute(
                select(func.count()).where(
                    (Proposal.reject_reason == "non_finite_reward")
                    | ((Proposal.step == 0) & Proposal.reward.is_(None))
                )
            ).scalar()
            or 0
        )
    used = [state for cid, state in finals.items() if cid not in nan_hit]
    report.exact_chains = len(used)
    if used:
        model = ToyModel()
        kernel = KernelConfig(beta=1.0, max_new_tokens=3)
        exact = step_distribution(
            model.lm_distribution(3), transition_matrix(model, kernel), plan.steps
        )
        report.tv = total_variation(empirical(used), exact)
        report.tv_limit = tv_bound(exact, len(used))
        if not report.tv < report.tv_limit:
            fail(
                f"final states are {report.tv:.4f} from the exact law (bound {report.tv_limit:.4f})"
            )
    if len(used) < plan.chains // 2:
        fail(f"only {len(used)} chains left for the exactness check")


def crash_free_rows(cfg: dict[str, Any], tmp: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of the same sweep run in this process with no fault, on fresh toy servers and a
    SQLite database of its own."""
    url = f"sqlite:///{tmp / 'crash-free.sqlite'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as gen,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as rm,
    ):
        clean = {**cfg, "generator": {**cfg["generator"], "urls": [gen.url]},
                 "reward": {**cfg["reward"], "urls": [rm.url]}}  # fmt: skip
        sweep_id, _ = create_sweep(sessions, parse_config(clean))

        async def go() -> None:
            service = StepService(sessions, concurrency=32)
            try:
                await run_locally(service, sweep_id, progress=False)
            finally:
                await service.close()

        asyncio.run(go())
    return smc_rows(url, "chaos")


def _verify_smc(report: Report, db: str, cfg: dict[str, Any], tmp: Path) -> None:
    """SMC particles: every block and barrier stored once, and the rows of a crash-free run."""
    fail = report.failures.append
    rows = smc_rows(db, "chaos")
    report.barriers = len(rows["barriers"])
    with make_sessionmaker(make_engine(db))() as s:
        report.finished_blocks = int(
            s.execute(select(func.count()).where(Proposal.endpoint == FINISHED_ENDPOINT)).scalar()
            or 0
        )
    try:
        smc_complete(rows)
    except AssertionError as exc:
        fail(f"SMC rows incomplete: {str(exc)[:500]}")
    reference = crash_free_rows(cfg, tmp)
    report.same_as_crash_free = rows == reference
    if not report.same_as_crash_free:
        differ = [k for k in rows if rows[k] != reference[k]]
        fail(f"the SMC rows differ from a crash-free run's in: {', '.join(differ)}")


def record(report: Report, command: str) -> None:
    """Append the summary under a "Chaos run" section of benchmarks/RESULTS.md."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text()
    heading = "## Chaos run (issue 6, item 1)"
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    entry = f"\nCommand: `{command}` ({when}).\n\n{report.table()}\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    path.write_text(text.rstrip("\n") + "\n" + entry)


def _jsonable(value: Any) -> Any:
    """The report as JSON: tuple keys joined, anything else unknown as its str()."""
    if isinstance(value, dict):
        return {
            "/".join(map(str, k)) if isinstance(k, tuple) else str(k): _jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--short", "--quick", action="store_true", help="the CI form (fewer faults)"
    )
    parser.add_argument(
        "--method",
        choices=("qalign", "smc"),
        default="qalign",
        help="the sweep's method (smc: prompts of particles with resampling barriers)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    plans = {("qalign", False): FULL, ("qalign", True): SHORT, ("smc", False): SMC_FULL,
             ("smc", True): SMC_SHORT}  # fmt: skip
    plan = replace(plans[(args.method, args.short)], seed=args.seed)
    report = run(plan)
    print(report.table())
    print("\n`qalign sweep status chaos` at the end:\n" + report.status_output)
    flags = (" --short" if args.short else "") + (" --method smc" if args.method == "smc" else "")
    if args.record:
        cmd = ".venv/bin/python benchmarks/chaos.py" + flags
        record(report, cmd + (f" --seed {args.seed}" if args.seed else ""))
    out = Path(os.environ.get("QALIGN_BENCH_OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    doc = _jsonable({"ok": report.ok, **dataclasses.asdict(report)})
    name = "chaos" + ("-smc" if args.method == "smc" else "") + ("-short" if args.short else "")
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
