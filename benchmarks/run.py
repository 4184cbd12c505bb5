"""Run every benchmark, one after the other, and say which completed and where each wrote.

    .venv/bin/python benchmarks/run.py            # the full figures behind benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # every benchmark's smoke variant (< 10 min)

`--only a,b` picks benchmarks by name, `--out DIR` sends every result file to DIR (CI uses a
temporary one so the committed results stay untouched). The test suite runs each quick benchmark
on its own (`--quick --only NAME`, tests/test_benchmarks_smoke.py) except `chaos` (its own test)
and `real_vllm` (run it here). Benchmarks that need the real vLLM
servers are skipped with a reason when `~/.cache/qalign/realsrv` is not set up
(`bash scripts/real-servers/setup.sh vllm`). Exits non-zero if any benchmark fails or writes
no result file; `summary.json` in the output directory lists command, seconds and files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REALSRV = Path(os.environ.get("QALIGN_REALSRV", Path.home() / ".cache/qalign/realsrv"))

# (name, script, needs the real vLLM servers); in the order they are cheapest to fail.
BENCHMARKS = [
    ("overhead", "overhead.py", False),
    ("lockstep", "lockstep.py", False),
    ("token_efficiency", "token_efficiency.py", False),
    ("saturation", "saturation.py", False),
    ("overoptimisation", "overoptimisation.py", False),
    ("stopping", "stopping.py", False),
    ("scale", "scale.py", False),
    ("dashboard", "dashboard.py", False),
    ("chaos", "chaos.py", False),
    ("checkers_agreement", "checkers_agreement.py", False),
    ("real_vllm", "real_vllm.py", True),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every benchmark's smoke variant")
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--out", type=Path, help="directory for result files (default: results/)")
    args = ap.parse_args()
    names = [b[0] for b in BENCHMARKS]
    chosen = args.only.split(",") if args.only else names
    if unknown := sorted(set(chosen) - set(names)):
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    out = (args.out or HERE / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QALIGN_BENCH_OUT": str(out)}
    summary: list[dict[str, object]] = []
    failed = False
    for name, script, real in BENCHMARKS:
        if name not in chosen or not (HERE / script).exists():
            continue
        cmd = [sys.executable, str(HERE / script), *(["--quick"] if args.quick else [])]
        entry: dict[str, object] = {"benchmark": name, "command": " ".join(cmd[1:])}
        if real and not (REALSRV / "venv-vllm" / "bin" / "python").exists():
            entry.update(status="skipped", reason=f"real servers not set up in {REALSRV}")
            summary.append(entry)
            print(f"== {name}: skipped ({entry['reason']})", flush=True)
            continue
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        before = {p: p.stat().st_mtime for p in out.glob("*.json")}
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env=env, cwd=ROOT)
        written = sorted(
            p.name for p in out.glob("*.json") if p.stat().st_mtime != before.get(p) and
            p.name != "summary.json"
        )  # fmt: skip
        ok = rc == 0 and bool(written)
        failed |= not ok
        entry.update(
            status="ok" if ok else "failed",
            returncode=rc,
            seconds=round(time.perf_counter() - t0, 1),
            files=written,
        )
        summary.append(entry)
        print(f"== {name}: {entry['status']} in {entry['seconds']} s, wrote {written}", flush=True)
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "benchmarks": summary,
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=2))
    print("\n| benchmark | status | seconds |\n|---|---|---|")
    for e in summary:
        print(f"| {e['benchmark']} | {e['status']} | {e.get('seconds', '')} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
