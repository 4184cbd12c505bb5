"""Dashboard page loads (issue 12, item 1) on the database of `benchmarks/scale.py`.

Builds that database (10,000 chains x 50 steps on PostgreSQL: `scale.py --keep`, its result
file sent to a temporary folder; `--quick`: scale's 400 x 24) or takes an existing one
(`--database URL`), serves `qalign dashboard` on it (read-only engine, in this process) and
times each page as a browser loads it: GET of the HTML, then of its JSON data, each to the last
byte over HTTP. Per page: median and max of `--reps` loads, beside a trivial endpoint
(`/healthz`, no database) timed in the same run.

The sweep and run pages need per-run analyses over every proposal (traces over steps, R-hat and
ESS, acceptance by cut, error-vs-compute curves). Those run on the dashboard's background
thread and never hold up a page: the first load of a page shows its SQL figures at once and the
plots once the analysis is done. Reported separately: the page loads while the analyses are
cold (the first load), the seconds each analysis took, and the page loads once they are cached.

Run: `.venv/bin/python benchmarks/dashboard.py [--quick] [--database URL] [--reps N]`; prints
a Markdown table and writes benchmarks/results/dashboard[-quick].json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from machine import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or HERE / "results")
TARGET_S = 1.0


def get(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
        assert r.status == 200, (url, r.status)
    return time.perf_counter() - t0


def build_scale(quick: bool) -> tuple[str, str]:
    """(database name, SQLAlchemy URL) of a database `scale.py --keep` built and kept."""
    with tempfile.TemporaryDirectory(prefix="dash-scale-out-") as out:
        cmd = [sys.executable, str(HERE / "scale.py"), "--keep", "--reps", "1",
               *(["--quick"] if quick else ["--real-seconds", "60"])]  # fmt: skip
        print("building the scale database:", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "QALIGN_BENCH_OUT": out},
                              capture_output=True, text=True)  # fmt: skip
    m = re.search(r"kept database (\S+) \((\S+)\)", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"scale.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")  # fmt: skip
    return m.group(1), m.group(2).replace("postgresql://", "postgresql+psycopg://", 1)


def pages(url: str) -> dict[str, tuple[str, str]]:
    """Page name -> (HTML path, JSON path), for the largest sweep, run, prompt and chain."""
    from sqlalchemy import text

    from qalign.dashboard.db import readonly_engine

    engine = readonly_engine(url)
    with engine.connect() as conn:
        sweep = conn.execute(text("SELECT MIN(id) FROM sweeps")).scalar_one()
        run = conn.execute(
            text("SELECT MIN(id) FROM runs WHERE sweep_id = :s"), {"s": sweep}
        ).scalar_one()
        chain = conn.execute(
            text("SELECT MAX(id) FROM chains WHERE run_id = :r"), {"r": run}
        ).scalar_one()
    engine.dispose()
    return {
        "sweeps": ("/", "/api/sweeps"),
        "sweep": (f"/sweep/{sweep}", f"/api/sweep/{sweep}"),
        "run": (f"/run/{run}", f"/api/run/{run}?prompt=0"),
        "chain": (f"/chain/{chain}", f"/api/chain/{chain}"),
    }


def summary(xs: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(xs), "max_s": max(xs), "runs_s": xs}


def measure(url: str, reps: int) -> dict[str, Any]:
    from qalign.dashboard.app import serve_in_thread
    from qalign.dashboard.db import readonly_engine

    targets = pages(url)
    engine = readonly_engine(url)
    res: dict[str, Any] = {}
    with serve_in_thread(engine) as served:
        base = served.url
        get(base + "/healthz")  # connection set-up, imports
        # Cold: the first load of each page, while its analyses have not run yet.
        res["cold"] = {name: get(base + h) + get(base + j) for name, (h, j) in targets.items()}
        t0 = time.perf_counter()
        run_ids = [int(k[1]) for k in list(served.cache._entries)]
        for kind, run_id in list(served.cache._entries):
            served.cache.wait(kind, run_id, timeout=1800)
        res["analysis_ready_s"] = time.perf_counter() - t0
        res["analysis_seconds"] = {
            f"{kind} {rid}": round(e.result.get("seconds", 0.0), 2) if e.result else None
            for (kind, rid), e in served.cache._entries.items()
        }
        res["analysed_runs"] = sorted(set(run_ids))
        # A load after the analyses, so each page's next load finds them current.
        for h, j in targets.values():
            get(base + h), get(base + j)
        for _ in range(5):
            pending = [k for k, e in served.cache._entries.items() if e.pending is not None]
            if not pending:
                break
            for kind, rid in pending:
                served.cache.wait(kind, rid, timeout=1800)
            for h, j in targets.values():
                get(base + h), get(base + j)
        res["baseline"] = summary([get(base + "/healthz") for _ in range(reps)])
        res["static"] = summary(
            [
                get(base + "/static/dashboard.js") + get(base + "/static/dashboard.css")
                for _ in range(reps)
            ]
        )
        res["pages"] = {}
        for name, (h, j) in targets.items():
            html, data = [], []
            for _ in range(reps):
                html.append(get(base + h))
                data.append(get(base + j))
            total = [a + b for a, b in zip(html, data, strict=True)]
            res["pages"][name] = {
                "html": summary(html),
                "json": summary(data),
                "page": summary(total),
                "paths": [h, j],
            }
    engine.dispose()
    return res


def table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    ms = 1000
    lines = [
        f"CPU: {doc['machine']['cpu']} ({doc['machine']['cpus']} cores); database: "
        f"{doc['database']}; {doc['reps']} loads per page",
        "",
        "| page | HTML median ms | JSON median ms | page median ms | page max ms | first load "
        "(cold analyses) ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in r["pages"].items():
        lines.append(
            f"| {name} | {p['html']['median_s'] * ms:.1f} | {p['json']['median_s'] * ms:.1f} | "
            f"{p['page']['median_s'] * ms:.1f} | {p['page']['max_s'] * ms:.1f} | "
            f"{r['cold'][name] * ms:.1f} |"
        )
    lines.append(
        f"| baseline `/healthz` | | | {r['baseline']['median_s'] * ms:.1f} | "
        f"{r['baseline']['max_s'] * ms:.1f} | |"
    )
    lines.append("")
    lines.append(
        f"background analyses ready {r['analysis_ready_s']:.1f} s after the first loads; each: "
        + ", ".join(f"{k} {v} s" for k, v in r["analysis_seconds"].items())
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="scale.py --quick's database")
    ap.add_argument("--database", help="an existing database (e.g. a `scale.py --keep` one)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 10)
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    built = None
    url = args.database
    if url is None:
        built, url = build_scale(args.quick)
    try:
        from sqlalchemy import text

        from qalign.dashboard.db import readonly_engine

        engine = readonly_engine(url)
        with engine.connect() as conn:
            counts = {
                t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                for t in ("sweeps", "runs", "chains", "proposals", "answers")
            }
        engine.dispose()
        print(f"database: {counts}", flush=True)
        results = measure(url, reps)
    finally:
        if built is not None:
            sys.path.insert(0, str(HERE))
            from scale import pg_drop

            pg_drop(built)
    from qalign.storage.engine import redact_url

    doc = {
        "benchmark": "dashboard page loads (issue 12 item 1)",
        "command": "python benchmarks/dashboard.py" + (" --quick" if args.quick else ""),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "database": redact_url(url) if args.database else "scale.py --keep (dropped after)",
        "tables": counts,
        "reps": reps,
        "target_s": TARGET_S,
        "results": results,
        "elapsed_seconds": time.perf_counter() - started,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"dashboard{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    print()
    print(table(doc))
    print(f"\n{doc['elapsed_seconds']:.0f} s total; wrote {path}")


if __name__ == "__main__":
    main()
