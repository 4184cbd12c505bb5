"""Several hosts on one machine (issue 14, item 4): a sweep survives losing a host mid-sweep.

Every "host" is a Linux network namespace. The database host runs this test's own PostgreSQL
and Redis, the toy generator (0.5 s per sequence) and reward servers, and the reaper
(`qalign sweep reap --every 2 --stall-timeout 10`, as an operator's cron would); three worker
hosts each run one `qalign worker`. The hosts reach each other only through veth pairs this test
creates, joined by a bridge on the database host:

    qmh-XXXX-db  10.77.0.1 (bridge)  postgres :5432, redis :6379, generator :8000, reward :8001
       |-- veth --  qmh-XXXX-h1  10.77.0.11  qalign@host1
       |-- veth --  qmh-XXXX-h2  10.77.0.12  qalign@host2
       `-- veth --  qmh-XXXX-h3  10.77.0.13  qalign@host3  (cut off mid-sweep, restored later)

The subnet exists only inside these namespaces: the machine's own network, Redis and PostgreSQL
are never involved. The test process stays in the root namespace and reads PostgreSQL and Redis
through their Unix sockets in its temp directory (filesystem sockets are not scoped by network
namespace), so the root namespace gets no address and no route.

The cut sets host3's port on the bridge down: host3 loses its carrier and its packets are
dropped, as when a cable is pulled or a host freezes. Nothing tells the others; host3's steps
stay in flight and its broker messages unacknowledged. They are redone because the database,
not the broker, decides: the reaper re-enqueues every chain idle for 10 s, another host takes
the chain's next step (the step host3 had in flight), and when host3 comes back its late
attempts are refused by the compare-and-set on `chains.current_step`. Redis's own redelivery of
host3's unacknowledged messages (after its visibility timeout, 1 h) plays no part. The sweep's
`execution.stall_timeout` (also the longest one step may take) is 300 s, so host3's attempts
outlive the cut and do reach their commit after the restore.

Checked: the sweep finishes on the two remaining hosts; every chain has exactly one proposal per
step 0..N (none lost, none twice) and its state is the replay of its proposals; the chains host3
was driving when it was cut went on, on other hosts, from exactly the step host3 had in flight
(host3's unacknowledged messages in Redis name the chains, its log names the tasks); after the
restore host3 finishes those steps and the commit refuses them (its log says `duplicate`), no
row is added; then host3 alone takes every step of an extension of the sweep.

Needs root and `ip netns`; otherwise the test skips, unless $QALIGN_REQUIRE_NETNS=1
(scripts/test.sh sets it), which makes it fail instead. Everything it creates (namespaces, veth
pairs, processes, files) is removed at the end, also when it fails.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import glob
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from tests.sweeps_support import check_invariants, sweep_config, write_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "QALIGN_REQUIRE_NETNS"
SUBNET = "10.77.0"
DB_IP = f"{SUBNET}.1"
PG_PORT, REDIS_PORT, GEN_PORT, RM_PORT = 5432, 6379, 8000, 8001
QUEUE = "qalign-multihost"
SWEEP = "multihost"
HOSTS = 3
CUT = 3  # the host that is cut off
STEPS, EXTENDED = 12, 16
PROMPTS, CHAINS = 3, 6  # 18 chains: more than the 12 worker threads, so every host stays busy
CUT_AFTER = 12  # steps host3 commits before it is cut
REAP_AFTER = 10.0  # `qalign sweep reap --stall-timeout`: chains idle this long are re-enqueued
STEP_DEADLINE = 300.0  # the sweep's execution.stall_timeout: how long one step may take
GEN_TIMEOUT = 120.0  # generator.timeout: one request
GEN_LATENCY = 0.5  # seconds per generated sequence: a step is mostly waiting for the generator
# Below pytest's 600 s timeout: every wait of the test draws from this budget.
BUDGET_S = 540.0

T = TypeVar("T")


# ---- skipping --------------------------------------------------------------------------------


def _netns_unavailable() -> str | None:
    """Why this machine cannot run the test (None: it can)."""
    if os.geteuid() != 0:
        return "needs root: it creates network namespaces and veth pairs"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"qmh-probe-{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"`ip netns add` does not work here: {out.stderr.strip()}"
    try:  # `ip netns exec` also needs to mount a sysfs of the namespace
        out = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    if out.returncode != 0:
        return f"`ip netns exec` does not work here: {out.stderr.strip()}"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


# ---- the lab: namespaces, links, processes ---------------------------------------------------


@dataclass
class Proc:
    """A process started in a namespace, in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM
    stopped: bool = False  # stopped by the test on purpose: its exit is not a failure

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def offset(self) -> int:
        """The log's length now: what is written later starts there."""
        return self.log.stat().st_size if self.log.exists() else 0

    def since(self, offset: int) -> str:
        with self.log.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def reap(self, timeout: float) -> None:
        """Wait for the process; then SIGKILL it and whatever is left of its process group
        (e.g. PostgreSQL backends)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=30)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


@dataclass
class Lab:
    """The hosts of the test and everything started in them; `destroy` removes all of it."""

    root: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    modes: list[tuple[Path, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.db_ns = f"qmh-{self.tag}-db"
        self.host_ns = [f"qmh-{self.tag}-h{i}" for i in range(1, HOSTS + 1)]
        self.pg_dir = self.root / "pg"
        self.pg_data = self.pg_dir / "data"
        self.redis_sock = self.root / "redis.sock"
        # What the hosts use (TCP over the veth pairs) and what the test uses (Unix sockets).
        self.db_url = f"postgresql+psycopg://postgres@{DB_IP}:{PG_PORT}/qalign"
        self.local_db_url = (
            f"postgresql+psycopg://postgres@/qalign?host={self.pg_dir}&port={PG_PORT}"
        )
        self.broker_url = f"redis://{DB_IP}:{REDIS_PORT}/0"
        self.gen_url = f"http://{DB_IP}:{GEN_PORT}"
        self.rm_url = f"http://{DB_IP}:{RM_PORT}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",  # log lines reach the files as they happen
            "QALIGN_DATABASE_URL": self.db_url,
            "QALIGN_BROKER_URL": self.broker_url,
            "QALIGN_QUEUE": QUEUE,
        }

    # -- network -------------------------------------------------------------------------------

    def link_names(self, i: int) -> tuple[str, str]:
        """(host end, database-host end) of host i's veth pair (names <= 15 characters)."""
        return f"mh{self.tag}h{i}", f"mh{self.tag}d{i}"

    def build_network(self) -> None:
        db = self.db_ns
        _ip("netns", "add", db)
        self.namespaces.append(db)
        _ip("-n", db, "link", "set", "lo", "up")
        _ip("-n", db, "link", "add", "br0", "type", "bridge")
        _ip("-n", db, "addr", "add", f"{DB_IP}/24", "dev", "br0")
        _ip("-n", db, "link", "set", "br0", "up")
        for i, ns in enumerate(self.host_ns, start=1):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            host_end, db_end = self.link_names(i)
            self.links += [host_end, db_end]
            _ip("link", "add", host_end, "netns", ns, "type", "veth", "peer", "name", db_end,
                "netns", db)  # fmt: skip
            _ip("-n", db, "link", "set", db_end, "master", "br0")
            _ip("-n", db, "link", "set", db_end, "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", host_end)
            _ip("-n", ns, "link", "set", host_end, "up")

    def set_link(self, i: int, up: bool) -> None:
        """Plug or unplug host i: its port on the database host's bridge."""
        _ip("-n", self.db_ns, "link", "set", self.link_names(i)[1], "up" if up else "down")

    # -- processes -----------------------------------------------------------------------------

    def start(self, name: str, ns: str, argv: list[str], stop_signal: int = signal.SIGTERM) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as fh:
            # `ip netns exec` execs the command: the pid is the command's own.
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=ROOT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, stop_signal)
        self.procs.append(proc)
        return proc

    def qalign(self, ns: str, *args: str, timeout: float = 180) -> str:
        """Run a qalign command on a host; its output, or an assertion error with it."""
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "qalign.cli", *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=ROOT,
            timeout=timeout,
        )
        assert out.returncode == 0, f"qalign {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def start_postgres(self) -> Proc:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        assert bins, "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
        bindir = Path(bins[-1]).parent
        # PostgreSQL refuses to run as root: the cluster belongs to `postgres`, which must be
        # able to reach it through pytest's directories (mode 0700): search permission only.
        self._allow_traversal(self.root)
        self.pg_dir.mkdir()
        shutil.chown(self.pg_dir, "postgres", "postgres")
        as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        out = subprocess.run(
            [*as_postgres, str(bindir / "initdb"), "-D", str(self.pg_data), "-A", "trust",
             "-U", "postgres", "--no-sync", "-E", "UTF8"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert out.returncode == 0, f"initdb: {out.stderr}"
        with (self.pg_data / "pg_hba.conf").open("a") as fh:
            fh.write(f"host all all {SUBNET}.0/24 trust\n")  # the worker hosts, over TCP
        options = {
            "listen_addresses": DB_IP,
            "port": str(PG_PORT),
            "unix_socket_directories": str(self.pg_dir),
            "max_connections": "300",
            # a throwaway cluster: an OS crash is not what this test is about
            "fsync": "off",
            "full_page_writes": "off",
            # A host lost mid-transaction would hold its row locks until the server's TCP
            # keepalive noticed (2 h by default); a deployment over several hosts wants these.
            "idle_in_transaction_session_timeout": "10s",
            "tcp_keepalives_idle": "5",
            "tcp_keepalives_interval": "2",
            "tcp_keepalives_count": "3",
        }
        argv = [*as_postgres, str(bindir / "postgres"), "-D", str(self.pg_data)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        # SIGINT: a fast shutdown, which removes the server's shared memory
        return self.start("postgres", self.db_ns, argv, stop_signal=signal.SIGINT)

    def _allow_traversal(self, path: Path) -> None:
        """Give others search permission on `path` and each of its parents that lacks it
        (pytest makes its temp directories 0700); `destroy` restores the modes."""
        for p in [path, *path.parents]:
            mode = stat.S_IMODE(p.stat().st_mode)
            if not mode & stat.S_IXOTH:
                self.modes.append((p, mode))
                p.chmod(mode | stat.S_IXOTH)

    def start_redis(self) -> Proc:
        return self.start(
            "redis",
            self.db_ns,
            ["redis-server", "--bind", DB_IP, "--port", str(REDIS_PORT),
             "--unixsocket", str(self.redis_sock), "--unixsocketperm", "700",
             "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--daemonize", "no"],
        )  # fmt: skip

    def start_toy(self, name: str, port: int, *extra: str) -> Proc:
        return self.start(
            name,
            self.db_ns,
            [sys.executable, "-m", "qalign.cli", "toy-server", "--host", DB_IP,
             "--port", str(port), *extra],
        )  # fmt: skip

    def start_worker(self, i: int) -> Proc:
        return self.start(
            f"worker{i}",
            self.host_ns[i - 1],
            [sys.executable, "-m", "qalign.cli", "worker", "--name", worker_name(i),
             "--concurrency", "4", "--steps-per-task", "4", "--loglevel", "INFO"],
            # at teardown: a warm shutdown would wait for steps a cut-off host cannot finish
            stop_signal=signal.SIGKILL,
        )  # fmt: skip

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(f"---- {p.name} (log tail) ----\n{p.text()[-chars:]}" for p in self.procs)

    # -- teardown ------------------------------------------------------------------------------

    def destroy(self) -> list[str]:
        """Stop every process, delete the namespaces and links, restore the directory modes and
        delete the files. Returns what could not be removed."""
        for p in self.procs:
            p.signal(p.stop_signal)
        for p in self.procs:
            p.reap(timeout=20)
        left: list[str] = [f"process {p.name} ({p.popen.pid})" for p in self.procs if p.alive()]
        for ns in reversed(self.namespaces):  # deleting a namespace deletes the links inside it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for name in self.links:  # a link left in the root namespace by a half-done setup
            if subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0:
                subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [f"namespace {ns}" for ns in self.namespaces if ns in listed]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        left += [f"link {name}" for name in self.links if f" {name}@" in links]
        for path, mode in reversed(self.modes):
            with contextlib.suppress(OSError):
                path.chmod(mode)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            left.append(f"directory {self.root}")
        return left


def worker_name(i: int) -> str:
    return f"qalign@host{i}"


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = _netns_unavailable()
    if reason is not None:
        _skip_or_fail(reason)
    # A short directory under pytest's base temp dir rather than tmp_path (named after the
    # test): a Unix socket's path must fit in 107 bytes.
    root = tmp_path_factory.mktemp("mh")
    longest = root / "pg" / ".s.PGSQL.5432"
    assert len(str(longest)) <= 107, f"{longest} is too long for a Unix socket; use --basetemp"
    lab = Lab(root)
    try:
        yield lab
    finally:
        left = lab.destroy()
        assert not left, f"left behind: {left}"


# ---- observing -------------------------------------------------------------------------------


class Budget:
    """The test's time, shared by all its waits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def wait(
        self, what: str, check: Callable[[], T], lab: Lab, timeout: float, poll: float = 0.25
    ) -> T:
        """Poll `check` until it returns something true; fail after `timeout` seconds (or when
        the budget runs out, or when a process of the lab died)."""
        end = min(self.end, time.monotonic() + timeout)
        while True:
            got = check()
            if got:
                return got
            dead = [p.name for p in lab.procs if not p.alive() and not p.stopped]
            assert not dead, f"{dead} exited while waiting for {what}\n{lab.tails()}"
            assert time.monotonic() < end, f"timed out waiting for {what}\n{lab.tails()}"
            time.sleep(poll)


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def chain_counts(engine: Engine) -> dict[str, int]:
    return {s: n for s, n in rows(engine, "SELECT status, COUNT(*) FROM chains GROUP BY status")}


def all_done(engine: Engine, chains: int, steps: int) -> bool:
    done = rows(
        engine,
        "SELECT COUNT(*) FROM chains WHERE status = 'done' AND current_step = :s",
        s=steps,
    )
    return bool(done[0][0] == chains)


def committed_by(engine: Engine, worker: str) -> int:
    n = rows(engine, "SELECT COUNT(*) FROM proposals WHERE worker = :w", w=worker)
    return int(n[0][0])


RECEIVED = re.compile(r"Task qalign\.step\[([0-9a-f-]+)\] received")
ENDED = re.compile(
    r"Task qalign\.step\[([0-9a-f-]+)\] (?:succeeded in [0-9.e-]+s: '(\w+)'|raised|failed|retry)"
)


def open_tasks(log: str) -> set[str]:
    """Ids of the tasks a worker's log shows received and not yet ended."""
    ended = {m.group(1) for m in ENDED.finditer(log)}
    return {m.group(1) for m in RECEIVED.finditer(log)} - ended


def unacked(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """Task id -> (chain, step) of every message delivered to a worker and not acknowledged
    (kombu's Redis transport keeps them in the `unacked` hash until they are)."""
    out: dict[str, tuple[int, int]] = {}
    for raw in r.hvals("unacked"):
        message = json.loads(raw)[0]
        args = json.loads(base64.b64decode(message["body"]))[0]
        out[message["headers"]["id"]] = (int(args[0]), int(args[1]))
    return out


def check_steps(engine: Engine, chains: int, steps: int) -> None:
    """Nothing lost, nothing twice: each chain has one proposal per step 0..steps."""
    total, distinct = rows(
        engine, "SELECT COUNT(*), COUNT(DISTINCT (chain_id, step)) FROM proposals"
    )[0]
    assert total == distinct == chains * (steps + 1), (total, distinct)
    per_chain = rows(
        engine,
        "SELECT chain_id, COUNT(*), MIN(step), MAX(step) FROM proposals GROUP BY chain_id",
    )
    assert len(per_chain) == chains
    for cid, n, lo, hi in per_chain:
        assert (n, lo, hi) == (steps + 1, 0, steps), (cid, n, lo, hi)


# ---- the test --------------------------------------------------------------------------------


def test_a_host_cut_off_mid_sweep(lab: Lab) -> None:
    budget = Budget(BUDGET_S)
    t0 = time.monotonic()
    # the test's own clients, through the Unix sockets (they connect when first used)
    broker = redis.Redis(unix_socket_path=str(lab.redis_sock))
    admin = create_engine(
        f"postgresql+psycopg://postgres@/postgres?host={lab.pg_dir}&port={PG_PORT}",
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
    )
    engine = create_engine(lab.local_db_url, poolclass=NullPool)
    try:
        lab.build_network()
        pg = lab.start_postgres()
        rd = lab.start_redis()
        gen = lab.start_toy("generator", GEN_PORT, "--served-model-name", "toy-lm",
                            "--latency-base", str(GEN_LATENCY))  # fmt: skip
        rm = lab.start_toy("reward", RM_PORT, "--served-model-name", "toy-rm")
        budget.wait("Redis", lambda: _ping(broker), lab, 60)
        budget.wait("PostgreSQL", lambda: _connects(admin), lab, 120)
        with admin.connect() as conn:
            conn.exec_driver_sql('CREATE DATABASE "qalign"')
        for toy in (gen, rm):
            budget.wait(f"the {toy.name} server", _logged(toy, "listening on"), lab, 60)
        lab.qalign(lab.host_ns[0], "db", "upgrade")  # once, from any host, over its veth pair
        workers = {i: lab.start_worker(i) for i in range(1, HOSTS + 1)}
        # The operator's cron on the database host. Its --stall-timeout (one threshold for all
        # sweeps) is below the sweep's own execution.stall_timeout, which also bounds each step:
        # the chains host3 holds are handed on after REAP_AFTER s, while host3's own attempts
        # at their steps stay alive across the cut and reach their commit after the restore.
        reap = ["sweep", "reap", "--every", "2", "--stall-timeout", str(REAP_AFTER)]
        reaper = lab.start("reaper", lab.db_ns, [sys.executable, "-m", "qalign.cli", *reap])
        cfg = sweep_config(
            SWEEP, lab.gen_url, lab.rm_url, prompts=PROMPTS, beta=1.0, steps=STEPS, chains=CHAINS,
            execution={"stall_timeout": STEP_DEADLINE, "max_attempts": 10},
        )  # fmt: skip
        # A generator request of host3 caught by the cut waits for its answer (dropped, not
        # refused) until the restore, instead of timing out and asking again.
        cfg["generator"]["timeout"] = GEN_TIMEOUT
        config = write_config(lab.root, cfg)
        lab.qalign(lab.db_ns, "sweep", "create", str(config))  # checks both servers from there
        for w in workers.values():
            budget.wait(f"{w.name} ready", _logged(w, " ready."), lab, 120)
        lab.qalign(lab.db_ns, "sweep", "run", SWEEP)
        chains = PROMPTS * CHAINS
        total_rows = chains * (STEPS + 1)
        cut_worker, cut_name = workers[CUT], worker_name(CUT)

        # ---- cut host3 off while it has committed steps and holds chains -------------------
        def busy() -> bool:
            held = open_tasks(cut_worker.text()) & set(unacked(broker))
            return committed_by(engine, cut_name) >= CUT_AFTER and bool(held)

        budget.wait(f"{cut_name} to commit steps and hold chains", busy, lab, 180, poll=0.1)
        cut_at = dt.datetime.now(dt.UTC)
        cut_log, reap_log = cut_worker.offset(), reaper.offset()
        lab.set_link(CUT, up=False)
        t_cut = time.monotonic()
        # What host3 had received and not finished: its messages stay in Redis's unacked hash
        # (it can no longer acknowledge them), which gives their (chain, step).
        before_cut = cut_worker.since(0)[:cut_log]
        held = {tid: cs for tid, cs in unacked(broker).items() if tid in open_tasks(before_cut)}
        assert held, f"{cut_name} held no message when it was cut\n{before_cut[-3000:]}"
        progress_at_cut = rows(engine, "SELECT COUNT(*) FROM proposals")[0][0]
        assert progress_at_cut < total_rows // 2, "the cut came too late to matter"

        # ---- the sweep finishes on host1 and host2 -----------------------------------------
        budget.wait("the sweep to finish without host3",
                    lambda: all_done(engine, chains, STEPS), lab, 300)  # fmt: skip
        t_done = time.monotonic()
        check_steps(engine, chains, STEPS)
        check_invariants(lab.local_db_url)  # and each chain's state replays from its proposals
        # The chains host3 was driving went on from the very step host3 had in flight (the one
        # after its last commit on the chain since the message it held), taken by another host
        # after the cut.
        proposals = rows(engine, "SELECT chain_id, step, worker, created_at FROM proposals")
        by_step = {(c, s): (w, at) for c, s, w, at in proposals}
        redone: dict[int, tuple[int, str]] = {}
        after_cut: list[bool] = []
        for chain_id, first in held.values():
            mine = [s for (c, s), (w, _) in by_step.items()
                    if c == chain_id and s >= first and w == cut_name]  # fmt: skip
            step = max([first - 1, *mine]) + 1
            if step > STEPS:  # host3 finished the chain just before the cut
                continue
            worker, at = by_step[(chain_id, step)]
            assert worker != cut_name, (chain_id, step, worker)
            redone[chain_id] = (step, worker)
            # (a duplicate hint of the reaper's may have had a twin take it before the cut)
            after_cut.append(at > cut_at)
        assert redone and any(after_cut), f"nothing host3 held was redone after the cut: {held}"
        # The reaper is what handed them on: nothing else knew they were stuck.
        reaped = [int(n) for n in re.findall(r"re-enqueued (\d+) stalled", reaper.since(reap_log))]
        assert sum(reaped) >= 1, reaper.since(reap_log)
        for i in range(1, HOSTS + 1):
            if i != CUT:
                late = rows(
                    engine,
                    "SELECT COUNT(*) FROM proposals WHERE worker = :w AND created_at > :t",
                    w=worker_name(i),
                    t=cut_at,
                )[0][0]
                assert late > 0, f"{worker_name(i)} committed nothing after the cut"
        assert cut_worker.alive()
        host3_rows = committed_by(engine, cut_name)

        # ---- restore host3: its stale attempts are refused -----------------------------------
        restore_log = cut_worker.offset()
        lab.set_link(CUT, up=True)
        t_restore = time.monotonic()

        def stale_ended() -> dict[str, str] | None:
            log = cut_worker.since(cut_log)
            ended = {m.group(1): m.group(2) or "error" for m in ENDED.finditer(log)}
            return ended if set(held) <= set(ended) else None

        ended = budget.wait("host3's stale tasks to end", stale_ended, lab, 240)
        t_stale = time.monotonic()
        # Host3 finished proposals for steps another host had committed meanwhile, and the
        # commit's compare-and-set refused them: nothing was added.
        refused = {
            (int(c), int(s))
            for c, s in re.findall(r"chain (\d+) step (\d+): duplicate",
                                   cut_worker.since(restore_log))
        }  # fmt: skip
        assert refused, cut_worker.since(restore_log)[-3000:]
        assert refused <= {(c, s) for c, (s, _) in redone.items()}, (refused, redone)
        assert rows(engine, "SELECT COUNT(*) FROM proposals")[0][0] == total_rows
        assert committed_by(engine, cut_name) == host3_rows
        check_steps(engine, chains, STEPS)

        # ---- host3 alone takes an extension of the sweep ------------------------------------
        for i, w in workers.items():
            if i != CUT:
                w.stopped = True
                w.signal(signal.SIGTERM)  # warm shutdown
                w.reap(timeout=60)
                assert w.popen.returncode == 0, w.text()[-3000:]
        lab.qalign(lab.db_ns, "sweep", "extend", SWEEP, "--steps", str(EXTENDED))
        budget.wait("host3 to finish the extension",
                    lambda: all_done(engine, chains, EXTENDED), lab, 240)  # fmt: skip
        check_steps(engine, chains, EXTENDED)
        check_invariants(lab.local_db_url)
        new = rows(engine, "SELECT DISTINCT worker FROM proposals WHERE step > :s", s=STEPS)
        assert [w for (w,) in new] == [cut_name], new
        assert chain_counts(engine) == {"done": chains}
        print(
            f"multihost: held by {cut_name} at the cut (chain, step): {sorted(held.values())}; "
            f"redone by others (chain: step, host): {redone}; reaper re-enqueued {sum(reaped)}; "
            f"refused after the restore: {sorted(refused)}; stale task results: "
            f"{sorted(ended[t] for t in held)}; setup until the cut {t_cut - t0:.0f} s, "
            f"cut until done {t_done - t_cut:.0f} s, restore until stale tasks ended "
            f"{t_stale - t_restore:.0f} s, extension {time.monotonic() - t_stale:.0f} s"
        )
    except BaseException:
        print(lab.tails(6000))  # the logs go with the lab at teardown: show them first
        raise
    finally:
        broker.close()
        engine.dispose()
        admin.dispose()
    assert pg.alive() and rd.alive()


def _logged(proc: Proc, line: str) -> Callable[[], bool]:
    return lambda: line in proc.text()


def _ping(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


def _connects(engine: Engine) -> bool:
    from sqlalchemy.exc import OperationalError

    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except OperationalError:
        return False
