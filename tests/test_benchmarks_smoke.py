"""The benchmark harness in its quick form: every benchmark completes and writes its results.

Asserts nothing about the figures (those live in benchmarks/RESULTS.md); this only keeps the
harness runnable. The chaos run is left out here because its short form is its own CI test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_harness_completes_and_writes_results(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run import BENCHMARKS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    names = [name for name, _, _ in BENCHMARKS if name != "chaos"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path),
         "--only", ",".join(names)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    entries = {e["benchmark"]: e for e in summary["benchmarks"]}
    assert set(entries) == set(names)
    for entry in entries.values():
        if entry["status"] == "skipped":
            assert os.environ.get("QALIGN_REQUIRE_REAL_SERVERS") != "1", entry
            continue
        assert entry["status"] == "ok" and entry["files"], entry
        for file in entry["files"]:
            json.loads((tmp_path / file).read_text())  # complete, parseable JSON
