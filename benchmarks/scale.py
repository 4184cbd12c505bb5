"""Scale (issue 5, item 4): a 10,000-chain x 50-step sweep on PostgreSQL.

What it measures, on one fresh PostgreSQL database (dropped afterwards unless --keep):

* memory: the peak RSS of two real `qalign worker` processes and of the scheduler processes
  (`qalign sweep create`, `run`, `resume`, `status`), and the workers' RSS at 10/50/90 % of the
  steps they committed, to show it stays flat;
* `qalign sweep status NAME` wall time (CLI subprocess) and the in-process `repo.sweep_status`;
* `qalign sweep resume NAME` enqueueing every chain (one unfinished step each; the queue is
  purged between repetitions) and the in-process `enqueue_unfinished`;
* database bytes per proposal (`pg_total_relation_size('proposals')` / rows, and the whole
  database / rows);
* the README's analysis queries (acceptance per run, mean state reward per step, accuracy per
  step) with EXPLAIN ANALYZE, each the median of several runs.

Two zero-latency toy servers (generator and reward model, each in its own process) serve the
steps. Real workers run for as long as `--real-seconds` allows (steps/s on two shared cores is
far below what 510,000 HTTP steps in ~35 minutes would need); the proposals the workers did not
reach are then filled in SQL by copying each chain's own real proposals (same columns, sizes and
contents; `gen_seed` shifted), up to step `steps - 1`. `resume` is measured on that table (every
chain is one step short), then the workers take the last step of every chain for real, so the
status, size and query figures are on the full 10,000 x 51-row table (step 0 is the initial
sample). Answers: `qalign eval` checks the real phase's proposals with a toy task (first word
"yes"); the rest get the same verdict computed in SQL (the script checks that SQL and `eval`
agree on the real rows).

Run: `.venv/bin/python benchmarks/scale.py [--quick] [--keep]`; prints a Markdown table and
writes benchmarks/results/scale[-quick].json.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from saturation import PG_ADMIN, REDIS, ServerProc

from qalign.tasks.base import Check, TaskItem

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")
QALIGN = [sys.executable, "-m", "qalign.cli"]
TASK = "benchmarks.scale:FirstWordYes"

# The README's analysis queries, found by their leading comment.
README_QUERIES = {
    "acceptance per run": "-- acceptance rate and mean reward of proposals",
    "state reward per step": "-- mean reward of current states at each step",
    "accuracy per step": "-- accuracy of the chains' states at each step",
}
TARGET_S = {"status": 1.0, "resume": 10.0, "query": 1.0}


class FirstWordYes:
    """The toy task: the answer is the response's first word; right when it is "yes"."""

    name = "first-word-yes"

    def check(self, response: str, item: TaskItem) -> Check:
        words = response.split()
        answer = words[0] if words else None
        return Check(answer, answer == "yes", details={"words": len(words)})


# ------------------------------------------------------------------------------------------------
# processes and their memory


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes, from /proc (psutil is not a dependency)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


@dataclass
class Child:
    """A CLI subprocess whose peak RSS comes from the kernel (`wait4`'s ru_maxrss)."""

    args: list[str]
    env: dict[str, str]
    log: Path | None = None
    proc: subprocess.Popen[bytes] = field(init=False)
    started: float = field(init=False)
    seconds: float | None = None
    peak_rss: int | None = None
    cpu_seconds: float | None = None
    returncode: int | None = None

    def __post_init__(self) -> None:
        out: Any = self.log.open("w") if self.log else subprocess.PIPE
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*QALIGN, *self.args],
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def reap(self, block: bool) -> bool:
        """Collect the exit status and rusage (the Popen object is bypassed on purpose)."""
        if self.returncode is not None:
            return True
        pid, status, ru = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.seconds = time.perf_counter() - self.started
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode
        self.peak_rss = ru.ru_maxrss * 1024
        self.cpu_seconds = ru.ru_utime + ru.ru_stime
        return True

    def output(self) -> str:
        if self.log is not None:
            return self.log.read_text(errors="replace")
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode(errors="replace")

    def stop(self, timeout: float = 60) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self.reap(block=False):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.reap(block=True)
                    break
                time.sleep(0.1)


def run_cli(*args: str, env: dict[str, str], timeout: float = 3600) -> Child:
    """Run `qalign ARGS` to completion; its stdout (pipe read after exit) is small."""
    log = Path(tempfile.mkstemp(prefix="qalign-scale-", suffix=".log")[1])
    atexit.register(log.unlink, missing_ok=True)  # leave no temp files
    child = Child(list(args), env, log=log)
    deadline = time.monotonic() + timeout
    while not child.reap(block=False):
        if time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"qalign {' '.join(args)} timed out")
        time.sleep(0.01)
    if child.returncode != 0:
        raise RuntimeError(f"qalign {' '.join(args)} failed:\n{child.output()}")
    return child


# ------------------------------------------------------------------------------------------------
# database


def pg_db() -> tuple[str, str, str]:
    """(name, SQLAlchemy URL, psycopg URL) of a new database."""
    import psycopg

    name = f"qalign_scale_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    return (
        name,
        f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}",
        f"{base}/{name}",
    )


def pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg(url: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def scalar(conn: Any, sql: str, *params: Any) -> Any:
    return conn.execute(sql, params or None).fetchone()[0]


def progress(conn: Any) -> tuple[int, int, int]:
    """(committed steps, least and most advanced chain's step): cheap, from the chains table."""
    total, low, high = conn.execute(
        "SELECT SUM(current_step + 1), MIN(current_step), MAX(current_step) FROM chains"
    ).fetchone()
    return int(total or 0), int(-1 if low is None else low), int(-1 if high is None else high)


def readme_queries() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    out = {}
    for label, head in README_QUERIES.items():
        match = [b for b in blocks if b.lstrip().startswith(head)]
        if match:
            out[label] = match[0].strip().rstrip(";")
    return out


# ------------------------------------------------------------------------------------------------
# the workers phase


def sweep_config(
    name: str, gen: str, rm: str, prompts: int, chains: int, steps: int, max_new: int
) -> dict[str, Any]:
    return {
        "name": name,
        "method": "qalign",
        "generator": {"urls": [gen], "model": "toy-lm", "timeout": 120, "max_retries": 4},
        "reward": {"urls": [rm], "model": "toy-rm", "format": "vllm", "timeout": 120},
        "dataset": {"prompts": [f"Question {i}: answer yes or no." for i in range(prompts)]},
        "beta": [0.5, 1.0],  # two runs, so "per run" queries have more than one group
        "steps": steps,
        "chains_per_prompt": chains,
        "seed": 7,
        "max_new_tokens": max_new,
        "max_prompt_length": 64,
    }


def start_workers(
    n: int, concurrency: int, env: dict[str, str], tmp: Path, tag: str
) -> list[Child]:
    workers = [
        Child(
            [
                "worker",
                "--concurrency",
                str(concurrency),
                "--name",
                f"scale{i}-{tag}@bench",
                "--loglevel",
                "WARNING",
            ],
            env,
            log=tmp / f"worker{i}-{tag}.log",
        )
        for i in range(n)
    ]
    # With --loglevel WARNING the banner still prints "ready" only at INFO; wait on the broker
    # connection instead: a worker is up once its process is alive and has consumed a message,
    # which the caller observes through progress. Here only make sure nothing died at start-up.
    time.sleep(3)
    for w in workers:
        if w.reap(block=False):
            raise RuntimeError(f"worker exited at start-up:\n{w.output()}")
    return workers


def drive(
    conn: Any,
    workers: list[Child],
    target_steps: int,
    budget_s: float,
    min_low_step: int,
    every: float,
    max_high_step: int | None = None,
) -> dict[str, Any]:
    """Sample progress and worker memory until `target_steps` are committed, a chain reached
    `max_high_step`, or the budget is spent (but not before every chain reached
    `min_low_step`); then stop the workers."""
    start_steps, _, _ = progress(conn)
    cpu0 = {w.proc.pid: _cpu_seconds(w.proc.pid) for w in workers}
    t0 = time.perf_counter()
    samples: list[dict[str, Any]] = []
    while True:
        time.sleep(every)
        done, low, high = progress(conn)
        t = time.perf_counter() - t0
        sample: dict[str, Any] = {"t": round(t, 2), "steps": done - start_steps, "low": low}
        sample["rss"] = [_proc_status(w.proc.pid).get("VmRSS", 0) for w in workers]
        sample["cpu"] = [_cpu_seconds(w.proc.pid) - cpu0[w.proc.pid] for w in workers]
        samples.append(sample)
        if len(samples) % max(1, int(30 / every)) == 0:
            rate = sample["steps"] / t
            rss = "/".join(f"{r / 2**20:.0f}" for r in sample["rss"])
            print(
                f"    {t:7.0f} s  {done:>8} steps committed ({rate:6.1f}/s), least advanced "
                f"chain at step {low}, worker RSS {rss} MiB",
                flush=True,
            )
        for w in workers:
            if w.reap(block=False):
                raise RuntimeError(f"a worker died:\n{w.output()[-4000:]}")
        if done >= target_steps or (max_high_step is not None and high >= max_high_step):
            break
        if t >= budget_s and low >= min_low_step:
            break
    hwm = [_proc_status(w.proc.pid).get("VmHWM", 0) for w in workers]
    for w in workers:
        w.stop()
    final, low, _ = progress(conn)
    return {
        "seconds": time.perf_counter() - t0,
        "steps": final - start_steps,
        "steps_per_s": (final - start_steps) / (time.perf_counter() - t0),
        "least_advanced_step": low,
        "worker_peak_rss": [w.peak_rss or h for w, h in zip(workers, hwm, strict=True)],
        "worker_cpu_seconds": [w.cpu_seconds for w in workers],
        "samples": samples,
    }


def rss_at(samples: list[dict[str, Any]], shares: tuple[float, ...]) -> dict[str, list[int]]:
    """Worker RSS at the first sample past each share of the phase's committed steps."""
    total = samples[-1]["steps"]
    out = {}
    for share in shares:
        s = next((x for x in samples if x["steps"] >= share * total), samples[-1])
        out[f"{round(share * 100)}%"] = s["rss"]
    return out


# ------------------------------------------------------------------------------------------------
# the SQL fill


FILL_PROPOSALS = """
INSERT INTO proposals (chain_id, run_id, step, cut, new_tokens, response_len, text, reward,
    log_a, alpha, accepted, finish, reject_reason, gen_seed, gen_tokens, reward_tokens,
    gen_latency_ms, reward_latency_ms, endpoint, worker, error, created_at)
SELECT src.chain_id, src.run_id, g.step, src.cut, src.new_tokens, src.response_len, src.text,
    src.reward, src.log_a, src.alpha, src.accepted, src.finish, src.reject_reason,
    src.gen_seed + g.step, src.gen_tokens, src.reward_tokens, src.gen_latency_ms,
    src.reward_latency_ms, src.endpoint, src.worker, src.error, now()
FROM scale_real r
CROSS JOIN LATERAL generate_series(r.k + 1, %s) AS g(step)
JOIN proposals src ON src.chain_id = r.chain_id AND src.step = 1 + (g.step - 1) %% r.k
WHERE r.chain_id BETWEEN %s AND %s
"""

# The SQL twin of FirstWordYes.check (str.split() on the toy's single-space-separated words).
FILL_ANSWERS = """
INSERT INTO answers (proposal_id, task, answer, correct, correct_loose, details, checked_at)
SELECT p.id, 'first-word-yes', NULLIF(split_part(btrim(p.text), ' ', 1), ''),
    split_part(btrim(p.text), ' ', 1) = 'yes', NULL,
    json_build_object('words', CASE WHEN btrim(p.text) = '' THEN 0
        ELSE array_length(regexp_split_to_array(btrim(p.text), '\\s+'), 1) END),
    now()
FROM proposals p
WHERE NOT EXISTS (SELECT 1 FROM answers a WHERE a.proposal_id = p.id)
"""


def fill(conn: Any, last_step: int) -> dict[str, Any]:
    """Bring every chain to `last_step` by copying its own real proposals (see module doc)."""
    t0 = time.perf_counter()
    conn.execute("DROP TABLE IF EXISTS scale_real")
    conn.execute("CREATE TABLE scale_real AS SELECT id AS chain_id, current_step AS k FROM chains")
    if scalar(conn, "SELECT MIN(k) FROM scale_real") < 1:
        raise RuntimeError("a chain has no MCMC step to copy; give the real phase more time")
    lo, hi = conn.execute("SELECT MIN(chain_id), MAX(chain_id) FROM scale_real").fetchone()
    inserted = 0
    for start in range(lo, hi + 1, 1000):  # 1,000 chains per transaction
        cur = conn.execute(FILL_PROPOSALS, (last_step, start, start + 999))
        inserted += cur.rowcount
    conn.execute(
        "UPDATE chains SET current_step = %s, status = 'running', attempts = 0, "
        "last_error = NULL, updated_at = now() WHERE current_step < %s",
        (last_step, last_step),
    )
    # the status counters the step commit keeps, recomputed for the copied rows
    conn.execute(
        "UPDATE chains SET accepted_steps = a.acc, rejected_with_reason = a.rej, "
        "first_step_at = a.first, last_step_at = a.last FROM ("
        "SELECT chain_id, COUNT(*) FILTER (WHERE step > 0 AND accepted) AS acc, "
        "COUNT(*) FILTER (WHERE reject_reason IS NOT NULL) AS rej, "
        "MIN(created_at) AS first, MAX(created_at) AS last FROM proposals GROUP BY chain_id"
        ") AS a WHERE chains.id = a.chain_id"
    )
    return {"proposals_filled": inserted, "seconds": time.perf_counter() - t0}


def fill_answers(conn: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    n = conn.execute(FILL_ANSWERS).rowcount
    return {"answers_filled": n, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# measurements on the full table


def timed(fn: Callable[[], Any], reps: int) -> dict[str, Any]:
    fn()  # warm caches (buffers, catalog, imports), as an operator's second look would be
    secs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(secs), "runs_s": secs}


def measure_queries(conn: Any, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conn.execute("SET statement_timeout = '300s'")
    for label, sql in readme_queries().items():
        rows = conn.execute(sql).fetchall()
        res = timed(lambda sql=sql: conn.execute(sql).fetchall(), reps)
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}").fetchall())
        res.update(
            rows=len(rows),
            first_rows=[[_jsonable(v) for v in r] for r in rows[:3]],
            plan=plan,
            indexes_used=sorted(set(re.findall(r"Scan using (\w+)", plan))),
            sql=sql,
        )
        out[label] = res
        print(f"    {label:24s} {res['median_s'] * 1000:8.1f} ms  ({len(rows)} rows)", flush=True)
    return out


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return float(v) if hasattr(v, "__float__") else str(v)


def sizes(conn: Any) -> dict[str, Any]:
    n = scalar(conn, "SELECT COUNT(*) FROM proposals")
    q = conn.execute(
        "SELECT pg_relation_size('proposals'), pg_indexes_size('proposals'), "
        "pg_total_relation_size('proposals'), pg_total_relation_size('answers'), "
        "pg_total_relation_size('chains'), pg_database_size(current_database())"
    ).fetchone()
    heap, idx, total, answers, chains, db = (int(x) for x in q)
    index_sizes = dict(
        conn.execute(
            "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
            "WHERE relname = 'proposals' ORDER BY indexrelname"
        ).fetchall()
    )
    return {
        "proposals": n,
        "proposals_heap_bytes": heap,
        "proposals_index_bytes": idx,
        "proposals_total_bytes": total,
        "proposals_index_sizes": index_sizes,
        "answers_total_bytes": answers,
        "chains_total_bytes": chains,
        "database_bytes": db,
        "bytes_per_proposal": total / n,
        "heap_bytes_per_proposal": heap / n,
        "database_bytes_per_proposal": db / n,
        "answers_bytes_per_proposal": answers / n,
        "mean_new_tokens": float(scalar(conn, "SELECT AVG(gen_tokens) FROM proposals")),
        "mean_text_chars": float(scalar(conn, "SELECT AVG(length(text)) FROM proposals")),
    }


def purge(queue: str) -> int:
    import redis

    r = redis.Redis.from_url(REDIS)
    n = int(r.llen(queue))
    r.delete(queue)
    return n


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="400 chains x 24 steps (< 2 min)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--chains-per-prompt", type=int, default=None, help="per prompt and run")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64, help="threads per worker")
    ap.add_argument("--real-seconds", type=float, default=None, help="budget of the real phase")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the database")
    args = ap.parse_args()
    prompts = args.prompts or (10 if args.quick else 100)
    per_prompt = args.chains_per_prompt or (20 if args.quick else 50)
    steps = args.steps or (40 if args.quick else 50)
    budget = args.real_seconds or (5.0 if args.quick else 600.0)
    reps = args.reps if not args.quick else min(args.reps, 3)
    n_chains = 2 * prompts * per_prompt
    total_steps = n_chains * (steps + 1)
    started = time.perf_counter()
    print(
        f"scale: {n_chains} chains x {steps} steps (+ initial sample) = {total_steps} proposals; "
        f"real phase budget {budget:.0f} s",
        flush=True,
    )

    tmp = Path(tempfile.mkdtemp(prefix="qalign-scale-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    dbname, url, pg_url = pg_db()
    queue = f"qalign-scale-{uuid.uuid4().hex[:8]}"
    env = {
        "QALIGN_BROKER_URL": REDIS,
        "QALIGN_QUEUE": queue,
        "QALIGN_DATABASE_URL": url,
        # PostgreSQL here allows 100 connections, shared with other users; the default pool
        # (32 + 8 per process) of two workers nearly exhausts it.
        "QALIGN_DB_POOL_SIZE": "12",
        "QALIGN_DB_MAX_OVERFLOW": "4",
    }
    gen = ServerProc(served_model_names=("toy-lm",))
    rm = ServerProc(served_model_names=("toy-rm",))
    res: dict[str, Any] = {}
    workers: list[Child] = []
    try:
        run_cli("db", "upgrade", env=env)
        cfg_path = tmp / "scale.yaml"
        cfg_path.write_text(
            yaml.safe_dump(
                sweep_config(
                    "scale", gen.url, rm.url, prompts, per_prompt, steps, args.max_new_tokens
                )
            )
        )
        create = run_cli("sweep", "create", str(cfg_path), env=env)
        print(f"  sweep create: {create.seconds:.1f} s, peak RSS {create.peak_rss / 2**20:.0f} MiB")
        scheduler: dict[str, Any] = {
            "create": {"seconds": create.seconds, "peak_rss": create.peak_rss}
        }

        # ---- phase 1: real workers, as far as the budget goes
        print("  phase 1: real workers", flush=True)
        workers = start_workers(args.workers, args.concurrency, env, tmp, "p1")
        run = run_cli("sweep", "run", "scale", env=env)
        scheduler["run"] = {"seconds": run.seconds, "peak_rss": run.peak_rss}
        with pg(pg_url) as conn:
            # Stop before any chain takes its last step, so `resume` finds every chain unfinished.
            # (A Celery task runs up to 16 steps of its chain before requeueing it, so a sweep
            # needs well over 16 steps for every chain to have moved when the first one is near
            # its end: hence 40 steps even in --quick, so the first chain reaches its end only in
            # its third task, after every chain's first task was taken off the FIFO queue; with
            # 24, a loaded machine once had a chain at step 23 and another still at step 0.)
            p1 = drive(
                conn,
                workers,
                total_steps,
                budget,
                min_low_step=3,
                every=2.0,
                max_high_step=steps - 1,
            )
        workers = []
        p1["queue_left"] = purge(queue)
        p1["rss_at_progress"] = rss_at(p1["samples"], (0.1, 0.5, 0.9))
        p1["cpu_ms_per_step"] = 1000 * sum(p1["worker_cpu_seconds"]) / max(p1["steps"], 1)
        p1["projected_full_seconds"] = total_steps / p1["steps_per_s"]
        res["phase1"] = p1
        print(
            f"  phase 1: {p1['steps']} steps in {p1['seconds']:.0f} s ({p1['steps_per_s']:.1f}/s,"
            f" {p1['cpu_ms_per_step']:.1f} ms worker CPU/step); all {total_steps} would take "
            f"{p1['projected_full_seconds'] / 60:.0f} min",
            flush=True,
        )

        # ---- answers of the real proposals, by `qalign eval`
        ev = run_cli("eval", "scale", "--task", TASK, "--quiet", env=env)
        with pg(pg_url) as conn:
            res["eval"] = {
                "seconds": ev.seconds,
                "peak_rss": ev.peak_rss,
                "answers": scalar(conn, "SELECT COUNT(*) FROM answers"),
            }
            print(
                f"  qalign eval: {res['eval']['answers']} answers in {ev.seconds:.1f} s", flush=True
            )
            real_max_id = scalar(conn, "SELECT MAX(id) FROM proposals")

            # ---- fill to steps - 1 (unless the real phase got there)
            need_fill = p1["least_advanced_step"] < steps
            if need_fill:
                res["fill"] = fill(conn, steps - 1)
                res["fill"].update(fill_answers(conn))
                print(
                    f"  fill: {res['fill']['proposals_filled']} proposals and "
                    f"{res['fill']['answers_filled']} answers in {res['fill']['seconds']:.0f} s",
                    flush=True,
                )
            conn.execute("VACUUM (ANALYZE) proposals, answers, chains")
            unfinished = scalar(conn, "SELECT COUNT(*) FROM chains WHERE status <> 'done'")
            rows_at_resume = scalar(conn, "SELECT COUNT(*) FROM proposals")

        # ---- resume: every chain has one step left
        print(f"  resume ({unfinished} unfinished chains, {rows_at_resume} proposals)", flush=True)
        resume_runs = []
        for _ in range(reps):
            purge(queue)
            c = run_cli("sweep", "resume", "scale", env=env)
            m = re.search(r"enqueued (\d+)", c.output())
            resume_runs.append(
                {
                    "seconds": c.seconds,
                    "peak_rss": c.peak_rss,
                    "cpu_seconds": c.cpu_seconds,
                    "enqueued": int(m.group(1)) if m else None,
                    "queue_length": purge(queue),
                }
            )
        from qalign.dispatch.celery import BrokerSettings, CeleryDispatcher, celery_app
        from qalign.scheduler.sweeps import enqueue_unfinished
        from qalign.storage import repo
        from qalign.storage.engine import make_engine, make_sessionmaker

        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        sweep_id = int(repo.find_sweep(sessions, "scale").id)
        dispatcher = CeleryDispatcher(celery_app(BrokerSettings(url=REDIS, queue=queue)))

        def enqueue() -> None:
            purge(queue)
            enqueue_unfinished(sessions, sweep_id, dispatcher)

        inproc = timed(enqueue, reps)
        inproc["unfinished_chains_s"] = timed(
            lambda: repo.unfinished_chains(sessions, sweep_id), reps
        )["median_s"]
        res["resume"] = {
            "unfinished_chains": unfinished,
            "proposals_in_table": rows_at_resume,
            "cli_median_s": statistics.median(r["seconds"] for r in resume_runs),
            "cli_runs": resume_runs,
            "in_process_median_s": inproc["median_s"],
            "in_process_runs_s": inproc["runs_s"],
            "unfinished_chains_query_s": inproc["unfinished_chains_s"],
        }
        scheduler["resume"] = {
            "seconds": res["resume"]["cli_median_s"],
            "peak_rss": max(r["peak_rss"] for r in resume_runs),
        }
        print(
            f"    CLI {res['resume']['cli_median_s']:.2f} s (enqueued "
            f"{resume_runs[0]['enqueued']}), in-process {inproc['median_s']:.2f} s",
            flush=True,
        )

        # ---- phase 2: the last step of every chain, for real (the queue holds one copy)
        purge(queue)
        resume = run_cli("sweep", "resume", "scale", env=env)
        print(f"  phase 2: real workers take the last step ({resume.output().strip()})", flush=True)
        workers = start_workers(args.workers, args.concurrency, env, tmp, "p2")
        with pg(pg_url) as conn:
            p2 = drive(conn, workers, total_steps, 3600, min_low_step=steps, every=1.0)
        workers = []
        p2["queue_left"] = purge(queue)
        res["phase2"] = p2
        print(f"  phase 2: {p2['steps']} steps in {p2['seconds']:.0f} s", flush=True)

        with pg(pg_url) as conn:
            res["fill_answers_phase2"] = fill_answers(conn)
            conn.execute("VACUUM (ANALYZE) proposals, answers, chains")
            real_rows = scalar(
                conn,
                "SELECT COUNT(*) FROM proposals WHERE id <= %s OR id > %s",
                real_max_id,
                scalar(conn, "SELECT MAX(id) FROM proposals") - p2["steps"],
            )
            # The SQL verdicts must equal the checker's on the rows eval checked.
            res["sql_vs_eval_mismatches"] = scalar(
                conn,
                "SELECT COUNT(*) FROM answers a JOIN proposals p ON p.id = a.proposal_id "
                "WHERE p.id <= %s AND a.correct <> (split_part(btrim(p.text), ' ', 1) = 'yes')",
                real_max_id,
            )
            res["table"] = {
                "chains": scalar(conn, "SELECT COUNT(*) FROM chains"),
                "chains_done": scalar(conn, "SELECT COUNT(*) FROM chains WHERE status = 'done'"),
                "proposals": scalar(conn, "SELECT COUNT(*) FROM proposals"),
                "proposals_from_real_steps": real_rows,
                "answers": scalar(conn, "SELECT COUNT(*) FROM answers"),
            }
            print(f"  table: {res['table']}", flush=True)

            # ---- status, sizes, queries on the full table
            status_runs = []
            for _ in range(reps + 1):
                c = run_cli("sweep", "status", "scale", env=env)
                status_runs.append({"seconds": c.seconds, "peak_rss": c.peak_rss})
            status_runs = status_runs[1:]  # the first pays for cold page cache and .pyc
            inproc_status = timed(lambda: repo.sweep_status(sessions, sweep_id), reps)
            res["status"] = {
                "cli_median_s": statistics.median(r["seconds"] for r in status_runs),
                "cli_runs": status_runs,
                "in_process_median_s": inproc_status["median_s"],
                "in_process_runs_s": inproc_status["runs_s"],
                "startup_s": timed(lambda: run_cli("--help", env=env), 2)["median_s"],
            }
            scheduler["status"] = {
                "seconds": res["status"]["cli_median_s"],
                "peak_rss": max(r["peak_rss"] for r in status_runs),
            }
            print(
                f"  status: CLI {res['status']['cli_median_s']:.2f} s, in-process "
                f"{inproc_status['median_s'] * 1000:.0f} ms",
                flush=True,
            )
            res["sizes"] = sizes(conn)
            print(
                f"  bytes/proposal {res['sizes']['bytes_per_proposal']:.0f} (proposals with "
                f"indexes), {res['sizes']['database_bytes_per_proposal']:.0f} (whole database)",
                flush=True,
            )
            res["queries"] = measure_queries(conn, reps)
        engine.dispose()
        res["scheduler"] = scheduler
    finally:
        for w in workers:
            w.stop()
        gen.stop()
        rm.stop()
        purge(queue)
        if args.keep:
            print(f"kept database {dbname} ({pg_url})")
        else:
            pg_drop(dbname)

    doc = {
        "benchmark": "scale (issue 5 item 4)",
        "command": "python benchmarks/scale.py" + (" --quick" if args.quick else ""),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": "127.0.0.1:5432",
        },
        "chains": n_chains,
        "prompts": prompts,
        "runs": 2,
        "chains_per_prompt_per_run": per_prompt,
        "steps": steps,
        "max_new_tokens": args.max_new_tokens,
        "workers": args.workers,
        "worker_concurrency": args.concurrency,
        "real_seconds_budget": budget,
        "reps": reps,
        "elapsed_seconds": time.perf_counter() - started,
        **res,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"scale{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    print()
    print(table(doc))
    print(f"\n{doc['elapsed_seconds']:.0f} s total; wrote {path}")


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def table(d: dict[str, Any]) -> str:
    p1, p2, t = d["phase1"], d["phase2"], d["table"]
    q = d["queries"]
    rss, sz = p1["rss_at_progress"], d["sizes"]
    rows = [
        ("chains x steps", f"{d['chains']:,} x {d['steps']} ({t['proposals']:,} proposals)", "",
         f"{t['proposals_from_real_steps']:,} from real steps"),
        ("real steps/s (phase 1, 2 workers)", f"{p1['steps_per_s']:.0f}", "",
         f"{p1['steps']:,} steps in {p1['seconds']:.0f} s; {p1['cpu_ms_per_step']:.1f} ms "
         "worker CPU/step"),
        ("worker peak RSS (phase 1)", " / ".join(_mib(x) for x in p1["worker_peak_rss"]), "flat",
         "real"),
        ("worker RSS at 10/50/90 % of phase 1",
         "; ".join(f"{k}: " + "/".join(_mib(x) for x in v) for k, v in rss.items()), "flat",
         "real"),
        ("worker peak RSS (phase 2)", " / ".join(_mib(x) for x in p2["worker_peak_rss"]), "flat",
         "real"),
        ("scheduler peak RSS (create / run / resume / status)",
         " / ".join(_mib(d["scheduler"][k]["peak_rss"])
                    for k in ("create", "run", "resume", "status")), "flat", "real"),
        ("`sweep status` (CLI / in-process)",
         f"{d['status']['cli_median_s']:.2f} s / {d['status']['in_process_median_s'] * 1000:.0f}"
         " ms", "< 1 s", "full table"),
        ("`sweep resume` enqueueing all chains (CLI / in-process)",
         f"{d['resume']['cli_median_s']:.2f} s / {d['resume']['in_process_median_s']:.2f} s",
         "< 10 s", f"{d['resume']['unfinished_chains']:,} chains"),
        ("bytes per proposal (proposals + indexes / whole DB)",
         f"{sz['bytes_per_proposal']:.0f} / {sz['database_bytes_per_proposal']:.0f}", "",
         "full table"),
    ]  # fmt: skip
    for label, r in q.items():
        idx = ", ".join(r["indexes_used"]) or "none (sequential scan)"
        rows.append((f"query: {label}", f"{r['median_s'] * 1000:.0f} ms", "< 1 s", idx))
    lines = ["| figure | value | target | notes |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
