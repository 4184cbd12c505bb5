"""The benchmark harness in its quick form: each quick benchmark completes and writes results.

Asserts nothing about the figures (those live in benchmarks/RESULTS.md); this only keeps the
harness runnable. One test per benchmark, each through `benchmarks/run.py --quick --only NAME`,
so each gets its own time budget under pytest's 600 s. Left out: `chaos` (its short form is
tests/test_chaos.py) and `real_vllm` (minutes of GPU-less vLLM start-up; tests/test_real_vllm.py
covers the servers, and `benchmarks/run.py --only real_vllm` still runs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sweeps_support import Broker

ROOT = Path(__file__).resolve().parents[1]
SLOW = {"chaos", "real_vllm"}
# The subprocess gets less than pytest's 600 s so a slow benchmark fails with its output.
BUDGET = 540


def _quick_benchmarks() -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run import BENCHMARKS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return [name for name, _, _ in BENCHMARKS if name not in SLOW]


@pytest.mark.parametrize("name", _quick_benchmarks())
def test_quick_benchmark_completes_and_writes_results(
    name: str, tmp_path: Path, broker: Broker
) -> None:
    out = tmp_path / "out"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        # The benchmarks' Celery runs use this test's database of the session's own Redis.
        "QALIGN_BENCH_REDIS": broker.url,
        # Whatever a benchmark puts in the temp dir stays in this test's tmp_path.
        "TMPDIR": str(scratch),
    }
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out),
           "--only", name]  # fmt: skip
    # Its own process group: on timeout the benchmark run.py started is killed with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=BUDGET)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name} --quick took over {BUDGET} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-8000:]
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["benchmarks"]
    assert entry["benchmark"] == name
    assert entry["status"] == "ok" and entry["files"], entry
    for file in entry["files"]:
        json.loads((out / file).read_text())  # complete, parseable JSON
