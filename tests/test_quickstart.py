"""The seed package's Quick Start script runs unchanged against our package and toy servers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qalign.toy.server import ToyServerOptions, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"
SEED_README = ROOT.parent / "shared" / "seed" / "quest-alignment-1.0.13-PKG-INFO.txt"
GEN_NAME = "meta-llama/Llama-3.1-8B-Instruct"
RM_NAME = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"

# Runs the script verbatim with runpy, then reports what it left in `results`.
RUNNER = """
import json, runpy, sys
ns = runpy.run_path(sys.argv[1], run_name="__main__")
r = ns["results"]
print("RESULT:" + json.dumps({"state_path": r.state_path, "texts": r.texts}))
"""


def run_quickstart() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(QUICKSTART)],
        capture_output=True,
        text=True,
        timeout=540,  # under pytest's 600 s, so a hang fails here with the script's output
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT:"))
    return json.loads(line[len("RESULT:") :])


def check_quickstart_shape(result: dict, steps: int = 8) -> None:
    (path,) = result["state_path"]
    assert [rec["t"] for rec in path] == list(range(steps + 1))
    for rec in path:
        assert set(rec) >= {"t", "reward", "completion", "text", "index", "accept", "criterion"}
        assert all(isinstance(t, int) for t in rec["completion"])
        assert 0 < len(rec["completion"]) <= 50
        assert 0.0 <= rec["criterion"] <= 1.0
        assert rec["index"] < max(len(rec["completion"]), 1)
    assert path[0]["accept"] is True and path[0]["index"] == 0
    (texts,) = result["texts"]
    outputs = texts["outputs"]
    assert len(outputs) == steps + 1
    last = path[0]["text"]
    for rec, shown in zip(path, outputs, strict=True):
        if rec["accept"]:
            last = rec["text"]
        assert shown == last


def test_quickstart_script_is_the_seed_readme_verbatim():
    if not SEED_README.exists():
        pytest.skip("shared/seed is not beside this checkout")
    block = re.search(r"```python\n(.*?)```", SEED_README.read_text(), re.S)
    assert block is not None
    assert QUICKSTART.read_text() == block.group(1)


def test_quickstart_runs_unchanged_against_toy_servers():
    gen = ToyServerOptions(served_model_names=(GEN_NAME,), port=8000)
    rm = ToyServerOptions(served_model_names=(RM_NAME,), port=8001)
    with serve_in_thread(gen) as g, serve_in_thread(rm) as r:
        result = run_quickstart()
        assert g.metrics()["requests"].get("/v1/completions", 0) >= 9
        assert r.metrics()["requests"].get("/classify", 0) >= 9
    check_quickstart_shape(result)
