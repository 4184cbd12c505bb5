"""Server saturation: steps/s against the toy server's ceiling, a bare client and the reference.

A toy generator server with a capacity of C concurrent sequences and a latency model (each
sequence holds a slot for `latency_base + latency_per_token * generated tokens`) has a known
ceiling: with every slot always busy it completes

    ceiling = C / (latency_base + latency_per_token * mean generated tokens per step)   steps/s

A step is one generation on that server plus one reward call on a separate, zero-latency toy
reward server. The mean generated-token count is the generator's own count over the
measurement (`/metrics`: generated tokens / sequences), so the ceiling is the one for exactly
the workload that ran.

Every figure is a whole-span figure, timed alike for every client by the servers themselves:
all steps (chains x (steps + 1)) divided by the seconds from the first request either server
received to the last answer either sent (the toy servers' `first_request_at` /
`last_response_at`, reset before each measurement). Start-up probes, the prompt's templating,
the last chains' tail: all inside. (The reference's span starts at the first request its
`run` sends: its driver's own set-up checks before that are not the reference's work. For
Celery it starts at `sweep run`: the sweep was created and the workers started, idle, before,
as in a deployment that keeps its workers running; the workers' own start-up requests on their
first task are inside.) For
the modes that store proposals, the old steady-state figure (committed steps between the 10 %
and 90 % marks of `proposals.created_at`) is kept beside it as `window`.

Modes, measured in turn within each repetition (so each comparison is within one run):

* `bare`       -- `benchmarks/bare_client.py`: a step's requests (generate, detokenize,
                  classify) from a minimal aiohttp loop that caches and persists nothing
                  (the baseline for client overhead)
* `reference`  -- the reference implementation (`quest-alignment` from PyPI, in its own cached
                  venv; see benchmarks/reference.py), when it can be installed here
* `run`        -- `qalign run CONFIG` (SQLite, embedded runner, --concurrency 4*C)
* `celery-N`   -- N `qalign worker` processes (thread pool, --concurrency 4*C each, as many
                  chains in flight as `run` and `bare`) on PostgreSQL + Redis, every step
                  persisted

Each toy server runs in its own process (as a GPU server would), and every client is a
subprocess, so the figures include the clients' own start-up. Every measurement uses a fresh
database (SQLite file or a new PostgreSQL database) and an isolated Redis queue.

Run: `.venv/bin/python benchmarks/saturation.py [--quick]`; prints a Markdown table and writes
benchmarks/results/saturation[-quick].json.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")
QALIGN = [sys.executable, "-m", "qalign.cli"]
PG_ADMIN = os.environ.get("QALIGN_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("QALIGN_BENCH_REDIS", "redis://127.0.0.1:6379/0")

CAPACITY = 64
PROFILES = {
    "realistic": {"capacity": CAPACITY, "latency_base": 0.2, "latency_per_token": 0.02},
    "fast": {"capacity": CAPACITY, "latency_base": 0.02, "latency_per_token": 0.005},
}
# Targets (issue 14): on the realistic profile, whole-span share of the ceiling; on the fast
# (client-bound) profile, share of the bare client measured in the same repetition, and
# multiple of the reference implementation measured in the same repetition.
CEILING_TARGETS = {("realistic", "run"): 0.9, ("realistic", "celery-1"): 0.9}
BARE_TARGETS = {("fast", "run"): 0.8, ("fast", "celery-1"): 0.5}
REFERENCE_TARGETS = {("fast", "run"): 1.5}


# ------------------------------------------------------------------------------------------------
# toy servers, each in its own process


def _serve(opts_kw: dict[str, Any], conn: Any) -> None:
    from qalign.toy.server import ToyServerOptions, serve_in_thread

    with serve_in_thread(ToyServerOptions(port=0, **opts_kw)) as handle:
        conn.send(handle.url)
        conn.recv()  # block until told to stop


class ServerProc:
    def __init__(self, **opts_kw: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(opts_kw, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise RuntimeError("toy server did not start")
        self.url: str = self.conn.recv()

    def _call(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def metrics(self) -> dict[str, Any]:
        return self._call("GET", "/metrics")

    def reset(self) -> None:
        self._call("POST", "/admin/metrics/reset")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------------------------------------
# helpers


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    p = subprocess.run(
        [*QALIGN, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if p.returncode != 0:
        raise RuntimeError(f"qalign {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def sweep_config(
    name: str, gen: str, rm: str, chains: int, steps: int, max_new: int
) -> dict[str, Any]:
    return {
        "name": name,
        "method": "qalign",
        "generator": {"urls": [gen], "model": "toy-lm", "timeout": 120, "max_retries": 4},
        "reward": {"urls": [rm], "model": "toy-rm", "format": "vllm", "timeout": 120},
        "dataset": {"prompts": ["Answer yes or no."]},
        "beta": 1.0,
        "steps": steps,
        "chains_per_prompt": chains,
        "seed": 7,
        "max_new_tokens": max_new,
        "max_prompt_length": 64,
        "execution": {"concurrency": 4 * CAPACITY},
    }


def steady_state(db_url: str) -> dict[str, Any]:
    """Throughput between the 10 % and 90 % committed-step marks, and its mean gen tokens."""
    from sqlalchemy import select

    from qalign.storage.engine import make_engine, make_sessionmaker
    from qalign.storage.models import Proposal

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            rows = list(
                s.execute(
                    select(Proposal.created_at, Proposal.gen_tokens, Proposal.gen_latency_ms)
                ).all()
            )
    finally:
        engine.dispose()
    rows.sort(key=lambda r: r[0])
    n = len(rows)
    lo, hi = int(0.1 * n), int(0.9 * n) - 1
    window = rows[lo : hi + 1]
    secs = (rows[hi][0] - rows[lo][0]).total_seconds()
    return {
        "steps_total": n,
        "window_steps": hi - lo,
        "window_seconds": secs,
        "steps_per_s": (hi - lo) / secs,
        "wall_seconds_all": (rows[-1][0] - rows[0][0]).total_seconds(),
        "mean_gen_tokens": statistics.fmean(r[1] for r in window),
        "mean_gen_latency_ms_client": statistics.fmean(r[2] for r in window),
    }


def pg_db() -> tuple[str, str]:
    import psycopg

    name = f"qalign_sat_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    return name, f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"


def pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------------------------------------
# one measurement


def measure_run(gen: str, rm: str, chains: int, steps: int, max_new: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="qalign-sat-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    url = f"sqlite:///{tmp}/sat.sqlite"
    cfg = tmp / "sat.yaml"
    cfg.write_text(yaml.safe_dump(sweep_config("sat", gen, rm, chains, steps, max_new)))
    t0 = time.perf_counter()
    cli("run", str(cfg), "--database", url, "--quiet", "--concurrency", str(4 * CAPACITY))
    res = steady_state(url)
    res["command_seconds"] = time.perf_counter() - t0
    return res


def measure_celery(
    gen: str,
    rm: str,
    chains: int,
    steps: int,
    max_new: int,
    n_workers: int,
    before_run: Any = None,
) -> dict[str, Any]:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="qalign-sat-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    dbname, url = pg_db()
    queue = f"qalign-sat-{uuid.uuid4().hex[:8]}"
    env = {"QALIGN_BROKER_URL": REDIS, "QALIGN_QUEUE": queue, "QALIGN_DATABASE_URL": url}
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        cli("db", "upgrade", "--database", url)
        cfg = tmp / "sat.yaml"
        cfg.write_text(yaml.safe_dump(sweep_config("sat", gen, rm, chains, steps, max_new)))
        cli("sweep", "create", str(cfg), "--database", url, env=env)
        for i in range(n_workers):
            log = tmp / f"worker{i}.log"
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        *QALIGN,
                        "worker",
                        "--database",
                        url,
                        "--concurrency",
                        str(4 * CAPACITY),
                        "--name",
                        f"sat{i}-{queue}@bench",
                        "--loglevel",
                        "INFO",
                    ],
                    env={**os.environ, **env},
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 60
        while not all(" ready." in lg.read_text(errors="replace") for lg in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("workers did not start:\n" + logs[0].read_text())
            time.sleep(0.2)
        if before_run is not None:
            before_run()  # the workers are up and idle, as in a deployment that keeps them
        t0 = time.perf_counter()
        cli("sweep", "run", "sat", "--database", url, env=env)
        total = chains * (steps + 1)
        from sqlalchemy import func, select

        from qalign.storage.engine import make_engine, make_sessionmaker
        from qalign.storage.models import Proposal

        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        deadline = time.monotonic() + 600
        while True:
            with sessions() as s:
                done = s.execute(select(func.count(Proposal.id))).scalar_one()
            if done >= total:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done}/{total} steps committed")
            time.sleep(0.5)
        engine.dispose()
        res = steady_state(url)
        res["command_seconds"] = time.perf_counter() - t0
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        redis.Redis.from_url(REDIS).delete(queue)
        pg_drop(dbname)


def measure_bare(gen: str, rm: str, chains: int, steps: int, max_new: int) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_client.py"), "--gen", gen, "--rm", rm,
           "--chains", str(chains), "--steps", str(steps), "--max-new-tokens", str(max_new),
           "--concurrency", str(4 * CAPACITY)]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"bare client failed:\n{p.stdout}\n{p.stderr}")
    res: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    res["command_seconds"] = time.perf_counter() - t0
    return res


def measure_reference_mode(
    gen: str, rm: str, chains: int, steps: int, max_new: int
) -> dict[str, Any]:
    from reference import measure_reference

    t0 = time.perf_counter()
    res = measure_reference(gen, rm, chains=chains, steps=steps, max_new_tokens=max_new)
    res["command_seconds"] = time.perf_counter() - t0
    return res


def reference_available(build: bool) -> str | None:
    """None when the reference implementation can run here, else why not (`build`: install
    its cached environment when missing; else only use one that is there)."""
    try:
        from reference import ensure_reference_env, reference_env_ready
    except ImportError as exc:
        return f"benchmarks/reference.py: {exc}"
    if not build and not reference_env_ready():
        return "its cached environment is not built (python benchmarks/reference.py builds it)"
    try:
        ensure_reference_env()
    except Exception as exc:  # any failure to install it means "not measured"
        return f"{type(exc).__name__}: {exc}"
    return None


def measure(
    mode: str, prof: dict[str, Any], gen: ServerProc, rm: ServerProc, args: argparse.Namespace
) -> dict[str, Any]:
    """One measurement of `mode`, with the servers' own whole-span timing and request counts."""
    gen.reset()
    rm.reset()
    sizes = (gen.url, rm.url, args.chains, args.steps, args.max_new_tokens)
    if mode == "bare":
        r = measure_bare(*sizes)
    elif mode == "reference":
        r = measure_reference_mode(*sizes)
    elif mode == "run":
        r = measure_run(*sizes)
    else:
        r = measure_celery(*sizes, int(mode.split("-")[1]), lambda: (gen.reset(), rm.reset()))
    g, m = gen.metrics(), rm.metrics()
    firsts = [x["first_request_at"] for x in (g, m) if x["first_request_at"] is not None]
    lasts = [x["last_response_at"] for x in (g, m) if x["last_response_at"] is not None]
    span = max(lasts) - min(firsts)
    if mode == "reference":
        # Its driver checks the toy tokenizer against the server before `run` starts (not the
        # reference's work): its span is its own, from the first request `run` sends.
        span = r["seconds"]
    total = args.chains * (args.steps + 1)
    mean_tokens = g["generated_tokens"] / max(1, g["sequences"])
    ceiling = prof["capacity"] / (prof["latency_base"] + prof["latency_per_token"] * mean_tokens)
    work = ("/tokenize", "/detokenize", "/v1/completions", "/classify", "/pooling")
    r.update(
        steps=total,
        span_seconds=span,
        whole_steps_per_s=total / span,
        mean_gen_tokens=mean_tokens,
        ceiling_steps_per_s=ceiling,
        ratio=total / span / ceiling,
        generations=g["sequences"],
        requests={
            "generator": {k: g["requests"][k] for k in work if g["requests"][k]},
            "reward": {k: m["requests"][k] for k in work if m["requests"][k]},
        },
        requests_per_step=(
            sum(g["requests"][k] for k in work) + sum(m["requests"][k] for k in work)
        )
        / total,
    )
    if "window_seconds" in r:
        r["window_ratio"] = r["steps_per_s"] / ceiling
    return r


def expected_initial_len(max_new: int) -> float:
    from qalign.toy.model import ToyModel

    return sum(len(y) * p for y, p in ToyModel().lm_distribution(max_new).items())


# ------------------------------------------------------------------------------------------------


def summarise(
    prof_name: str, mode: str, runs: list[dict[str, Any]], bare: list[dict[str, Any]],
    ref: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """Medians over repetitions; ratios to bare / reference pair runs of the same repetition."""
    out: dict[str, Any] = {
        "mode": mode,
        "profile": prof_name,
        "ceiling_steps_per_s": statistics.median(x["ceiling_steps_per_s"] for x in runs),
        "whole_steps_per_s": statistics.median(x["whole_steps_per_s"] for x in runs),
        "ratio": statistics.median(x["ratio"] for x in runs),
        "per_rep_ratio": [round(x["ratio"], 3) for x in runs],
        "requests_per_step": statistics.median(x["requests_per_step"] for x in runs),
        "command_seconds": statistics.median(x["command_seconds"] for x in runs),
        "ceiling_target": CEILING_TARGETS.get((prof_name, mode)),
        "bare_target": BARE_TARGETS.get((prof_name, mode)),
        "reference_target": REFERENCE_TARGETS.get((prof_name, mode)),
        "runs": runs,
    }
    if all("window_ratio" in x for x in runs):
        out["window_ratio"] = statistics.median(x["window_ratio"] for x in runs)
    if bare and mode != "bare":
        per = [
            x["whole_steps_per_s"] / b["whole_steps_per_s"] for x, b in zip(runs, bare, strict=True)
        ]
        out["vs_bare"], out["per_rep_vs_bare"] = statistics.median(per), [round(v, 3) for v in per]
    if ref and mode != "reference":
        per = [
            x["whole_steps_per_s"] / b["whole_steps_per_s"] for x, b in zip(runs, ref, strict=True)
        ]
        out["vs_reference"] = statistics.median(per)
        out["per_rep_vs_reference"] = [round(v, 3) for v in per]
    return out


def _cell(value: float | None, target: float | None, fmt: str = ".2f") -> str:
    if value is None:
        return "–"
    text = f"{value:{fmt}}"
    if target is not None:
        text += f" ({'✅' if value >= target else '❌'} ≥ {target})"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sweeps, one repetition (< 3 min)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--chains", type=int, default=None, help="default 255 (--quick: 64)")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--quick: 4)")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--modes", default="bare,reference,run,celery-1,celery-2")
    ap.add_argument("--profiles", default="realistic,fast")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    args.chains = args.chains or (64 if args.quick else 255)
    args.steps = args.steps or (4 if args.quick else 20)
    modes = args.modes.split(",")
    skipped: dict[str, str] = {}
    if "reference" in modes:
        why = reference_available(build=not args.quick)
        if why is not None:
            print(f"reference implementation not measured: {why}", flush=True)
            skipped["reference"] = why
            modes.remove("reference")
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for prof_name in args.profiles.split(","):
        prof = PROFILES[prof_name]
        gen = ServerProc(served_model_names=("toy-lm",), **prof)
        rm = ServerProc(served_model_names=("toy-rm",))
        by_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        try:
            for rep in range(reps):
                for mode in modes:  # interleaved: each repetition compares like with like
                    r = measure(mode, prof, gen, rm, args)
                    by_mode[mode].append(r)
                    print(
                        f"  rep {rep + 1} {prof_name:9s} {mode:9s} {r['whole_steps_per_s']:8.1f}"
                        f" steps/s (whole span {r['span_seconds']:.1f} s) ceiling"
                        f" {r['ceiling_steps_per_s']:7.1f} ratio {r['ratio']:.3f}; requests/step"
                        f" {r['requests_per_step']:.2f}",
                        flush=True,
                    )
        finally:
            gen.stop()
            rm.stop()
        for mode in modes:
            results.append(
                summarise(
                    prof_name,
                    mode,
                    by_mode[mode],
                    by_mode.get("bare", []),
                    by_mode.get("reference", []),
                )
            )
    doc = {
        "benchmark": "saturation (issues 5 and 14)",
        "command": "python benchmarks/saturation.py" + (" --quick" if args.quick else ""),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "profiles": PROFILES,
        "chains": args.chains,
        "steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "expected_initial_len_exact": expected_initial_len(args.max_new_tokens),
        "reps": reps,
        "ceiling": "C / (latency_base + latency_per_token * generated tokens per sequence)",
        "figure": "chains*(steps+1) / (last answer - first request, as the toy servers saw them)",
        "not_measured": skipped,
        "elapsed_seconds": time.perf_counter() - started,
        "results": results,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"saturation{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=2))
    print()
    print("| profile | mode | steps/s (whole span) | share of ceiling | per rep | vs bare client |"
          " vs reference | requests/step | 10–90 % window |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['profile']} | {r['mode']} | {r['whole_steps_per_s']:.0f} | "
            f"{_cell(r['ratio'], r['ceiling_target'])} | "
            f"{' / '.join(f'{v:.2f}' for v in r['per_rep_ratio'])} | "
            f"{_cell(r.get('vs_bare'), r['bare_target'])} | "
            f"{_cell(r.get('vs_reference'), r['reference_target'])} | "
            f"{r['requests_per_step']:.2f} | {_cell(r.get('window_ratio'), None)} |"
        )
    print(
        f"\n{args.chains} chains x {args.steps} steps (+ initial sample), max_new_tokens "
        f"{args.max_new_tokens}, C={CAPACITY}, median of {reps}; CPU {cpu_model()!r}; "
        f"{doc['elapsed_seconds']:.0f} s total; wrote {path}"
    )


if __name__ == "__main__":
    main()
