"""Independent chains vs lock-step (issue 5, item 2).

The reference implementation advances all chains of a batch together: each step waits for the
slowest continuation. qalign's chains advance independently. Both modes run the same sweep
(identical decisions, thanks to counter-based randomness) against a toy server whose latency
grows with the number of generated tokens, so response lengths vary step to step.

Run: `python benchmarks/lockstep.py [--quick]`; prints steps/s of both modes and their ratio
(median of 3 repetitions) and writes benchmarks/results/lockstep[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from qalign.config import parse_config
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.service import StepService
from qalign.storage import ensure_schema, make_engine, make_sessionmaker
from qalign.toy.server import ToyServerOptions, serve_in_thread

OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")
PROFILE = {"capacity": 64, "latency_base": 0.02, "latency_per_token": 0.1}
MAX_NEW = 8


def once(gen: str, rm: str, chains: int, steps: int, lockstep: bool) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="qalign-lockstep-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    url = f"sqlite:///{tmp}/lock.sqlite"
    ensure_schema(url)
    sessions = make_sessionmaker(make_engine(url))
    cfg = parse_config(
        {
            "name": "lockstep",
            "generator": {"urls": [gen], "model": "toy-lm"},
            "reward": {"urls": [rm], "model": "toy-rm", "format": "vllm"},
            "dataset": {"prompts": ["Answer yes or no."]},
            "beta": 1.0,
            "steps": steps,
            "chains_per_prompt": chains,
            "max_new_tokens": MAX_NEW,
            "max_prompt_length": 64,
        }
    )
    sweep_id, _ = create_sweep(sessions, cfg)
    services = StepService(sessions, concurrency=4 * chains)

    async def go() -> None:
        try:
            await run_locally(services, sweep_id, progress=False, lockstep=lockstep)
        finally:
            await services.close()

    t0 = time.perf_counter()
    asyncio.run(go())
    return chains * (steps + 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    chains, steps, reps = (32, 6, 1) if args.quick else (32, 20, 3)
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0, **PROFILE)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        free = [once(g.url, r.url, chains, steps, lockstep=False) for _ in range(reps)]
        lock = [once(g.url, r.url, chains, steps, lockstep=True) for _ in range(reps)]
    res = {
        "profile": PROFILE,
        "max_new_tokens": MAX_NEW,
        "chains": chains,
        "steps": steps,
        "independent_steps_per_s": statistics.median(free),
        "lockstep_steps_per_s": statistics.median(lock),
        "runs": {"independent": free, "lockstep": lock},
    }
    res["ratio"] = res["independent_steps_per_s"] / res["lockstep_steps_per_s"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"lockstep{'-quick' if args.quick else ''}.json").write_text(json.dumps(res, indent=2))
    print("| mode | steps/s (median) |\n|---|---|")
    print(f"| independent chains | {res['independent_steps_per_s']:.1f} |")
    print(f"| lock-step | {res['lockstep_steps_per_s']:.1f} |")
    print(f"ratio {res['ratio']:.2f}x ({chains} chains x {steps} steps, {PROFILE}, {reps} reps)")


if __name__ == "__main__":
    main()
