"""Per-step CPU overhead (issue 5, item 3): client CPU milliseconds per committed step.

Zero-latency toy generator and reward servers, each in its own process, so everything the
client process burns is our overhead: task dispatch, the two HTTP calls, the SQL of a step.
The client is a real CLI subprocess:

* `run-sqlite` / `run-pg`       -- `qalign run CONFIG` (embedded runner)
* `celery-sqlite` / `celery-pg` -- one `qalign worker` process (thread pool) fed by Redis; the
  worker takes a step and enqueues the chain's next one, so dispatch is counted too

The client's CPU time (user + system, all threads, from /proc) and the committed-step count
are sampled every 0.2 s; the figure is the slope between the 20 % and 80 % progress marks, so
start-up and the tail are excluded. `--profile` also records a py-spy profile of the client
over the same window and prints where the time goes, grouped by component.

Run: `.venv/bin/python benchmarks/overhead.py [--quick] [--profile]`; prints a Markdown table
and writes benchmarks/results/overhead[-quick].json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saturation import QALIGN, REDIS, ROOT, ServerProc, cli, pg_db, pg_drop

OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")
TICK = os.sysconf("SC_CLK_TCK")
TARGET_MS = 5.0
CONCURRENCY = 64


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def config(gen: str, rm: str, chains: int, steps: int) -> dict[str, Any]:
    return {
        "name": "overhead",
        "method": "qalign",
        "generator": {"urls": [gen], "model": "toy-lm", "timeout": 120},
        "reward": {"urls": [rm], "model": "toy-rm", "format": "vllm", "timeout": 120},
        "dataset": {"prompts": ["Answer yes or no."]},
        "beta": 1.0,
        "steps": steps,
        "chains_per_prompt": chains,
        "seed": 11,
        "max_new_tokens": 6,
        "max_prompt_length": 64,
        "execution": {"concurrency": CONCURRENCY},
    }


# Which component a py-spy frame belongs to: the first matching pattern from the leaf up.
COMPONENTS = [
    ("SQL: driver", ("sqlite3", "psycopg/", "psycopg_binary")),
    ("SQL: SQLAlchemy", ("sqlalchemy/",)),
    ("broker: kombu/redis", ("kombu/", "redis/")),
    ("Celery", ("celery/", "billiard/")),
    ("HTTP: aiohttp", ("aiohttp/", "yarl/", "multidict/")),
    ("JSON", ("json/",)),
    ("retries: tenacity", ("tenacity/",)),
    ("asyncio + threads", ("asyncio/", "concurrent/futures", "threading.py", "selectors.py")),
    ("qalign", ("qalign/",)),
]


def components(raw: Path) -> dict[str, float]:
    """Share of samples by component; a sample counts for the innermost recognised frame."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        total += int(n)
        label = "other"
        for frame in reversed(frames):
            hit = next((name for name, pats in COMPONENTS if any(p in frame for p in pats)), None)
            if hit:
                label = hit
                break
        counts[label] += int(n)
    return {k: v / total for k, v in counts.most_common()} if total else {}


class Sampler:
    """CPU seconds of the client against committed steps, sampled over time."""

    def __init__(self, db_url: str) -> None:
        from qalign.storage.engine import make_engine

        self.engine = make_engine(db_url)
        self.points: list[tuple[float, float, int]] = []

    def count(self) -> int:
        with self.engine.connect() as c:
            return int(c.exec_driver_sql("SELECT count(*) FROM proposals").scalar_one())

    def sample(self, pid: int) -> int:
        n = self.count()
        self.points.append((time.monotonic(), cpu_seconds(pid), n))
        return n

    def slope(self, total: int) -> dict[str, float]:
        # The 20%..80% window; on a loaded machine samples are sparse and one sample can jump
        # past both marks, so the window then widens rather than dividing by zero steps.
        lo = next(p for p in self.points if p[2] >= 0.2 * total)
        later = [p for p in self.points if p[2] > lo[2]]
        hi = next((p for p in later if p[2] >= 0.8 * total), later[-1] if later else None)
        if hi is None:
            lo, hi = self.points[0], self.points[-1]
        steps = hi[2] - lo[2]
        if steps <= 0:
            raise RuntimeError(f"no step was committed between the samples {self.points}")
        return {
            "window_steps": steps,
            "cpu_ms_per_step": 1000 * (hi[1] - lo[1]) / steps,
            "steps_per_s": steps / (hi[0] - lo[0]),
        }

    def close(self) -> None:
        self.engine.dispose()


def measure(
    mode: str, gen: str, rm: str, chains: int, steps: int, profile: Path | None
) -> dict[str, Any]:
    import redis

    kind, backend = mode.split("-")
    tmp = Path(tempfile.mkdtemp(prefix="qalign-ovh-"))
    dbname = None
    if backend == "pg":
        dbname, url = pg_db()
    else:
        url = f"sqlite:///{tmp}/ovh.sqlite"
    queue = f"qalign-ovh-{uuid.uuid4().hex[:8]}"
    env = {"QALIGN_BROKER_URL": REDIS, "QALIGN_QUEUE": queue, "QALIGN_DATABASE_URL": url}
    cfg = tmp / "ovh.yaml"
    cfg.write_text(yaml.safe_dump(config(gen, rm, chains, steps)))
    total = chains * (steps + 1)
    cli("db", "upgrade", "--database", url)
    cli("sweep", "create", str(cfg), "--database", url, env=env)
    log = (tmp / "client.log").open("w")
    if kind == "run":
        argv = [*QALIGN, "run", str(cfg), "--database", url, "--quiet"]
    else:
        argv = [*QALIGN, "worker", "--database", url, "--concurrency", str(CONCURRENCY),
                "--name", f"ovh-{queue}@bench", "--loglevel", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    sampler = Sampler(url)
    spy: subprocess.Popen[bytes] | None = None
    try:
        # A first sample before any step is enqueued: a quick sweep can finish while
        # `sweep run` is still returning, and the window needs a start below 20 %.
        sampler.sample(proc.pid)
        if kind == "celery":
            cli("sweep", "run", "overhead", "--database", url, env=env)
        deadline = time.monotonic() + 900
        while (n := sampler.sample(proc.pid)) < total:
            if profile and spy is None and n >= 0.2 * total:
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(proc.pid),
                     "-r", "200", "--gil", "-f", "raw", "-o", str(profile), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            if spy is not None and spy.poll() is None and n >= 0.8 * total:
                spy.send_signal(signal.SIGINT)
            if proc.poll() is not None and kind == "run" and n < total:
                raise RuntimeError(f"qalign run exited early:\n{(tmp / 'client.log').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n}/{total} steps committed")
            time.sleep(0.2)
        res: dict[str, Any] = {"mode": mode, **sampler.slope(total)}
        if spy is not None:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
            spy.wait(60)
            res["profile"] = components(profile) if profile and profile.exists() else {}
        return res
    finally:
        sampler.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        redis.Redis.from_url(REDIS).delete(queue)
        if dbname:
            pg_drop(dbname)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sweeps, one repetition")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--modes", default="run-sqlite,run-pg,celery-sqlite,celery-pg")
    ap.add_argument("--profile", action="store_true", help="py-spy profile of each client")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    steps = args.steps or (8 if args.quick else 40)
    started = time.perf_counter()
    gen = ServerProc(served_model_names=("toy-lm",))
    rm = ServerProc(served_model_names=("toy-rm",))
    results = []
    prof_dir = OUT / "profiles"
    try:
        for mode in args.modes.split(","):
            runs = []
            for i in range(reps):
                prof = None
                if args.profile:
                    prof_dir.mkdir(parents=True, exist_ok=True)
                    prof = prof_dir / f"overhead-{mode}-{i}.txt"
                r = measure(mode, gen.url, rm.url, args.chains, steps, prof)
                runs.append(r)
                print(
                    f"  {mode:14s} {r['cpu_ms_per_step']:6.2f} ms CPU/step "
                    f"{r['steps_per_s']:7.1f} steps/s",
                    flush=True,
                )
            results.append(
                {
                    "mode": mode,
                    "cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in runs),
                    "steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
                    "runs": runs,
                }
            )
    finally:
        gen.stop()
        rm.stop()
    doc = {
        "benchmark": "per-step CPU overhead (issue 5 item 3)",
        "command": "python benchmarks/overhead.py" + (" --quick" if args.quick else ""),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "chains": args.chains,
        "steps": steps,
        "reps": reps,
        "concurrency": CONCURRENCY,
        "window": "20%..80% of committed steps; client CPU from /proc (user+system, all threads)",
        "elapsed_seconds": time.perf_counter() - started,
        "results": results,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"overhead{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=2))
    print()
    print("| client | CPU ms per step | steps/s | target |")
    print("|---|---|---|---|")
    for r in results:
        ok = "✅" if r["cpu_ms_per_step"] <= TARGET_MS else "❌"
        print(
            f"| {r['mode']} | {r['cpu_ms_per_step']:.2f} | {r['steps_per_s']:.0f} | "
            f"≤ {TARGET_MS:.0f} {ok} |"
        )
    for r in results:
        if r["runs"][0].get("profile"):
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["runs"][0]["profile"].items())
            print(f"\n{r['mode']}: {shares}")
    print(f"\n{doc['elapsed_seconds']:.0f} s total; wrote {path}")


if __name__ == "__main__":
    main()
