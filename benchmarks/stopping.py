"""Convergence-driven stopping: the fixed-budget accuracy with fewer steps.

A toy task on the toy servers: the answer is the first word of the response and "yes" is
correct. Two sweeps with the same seed, prompts and chains: one runs every chain a fixed number
of steps; the other adds `stop_when`, which retires a prompt's chains at the first checkpoint
where they have converged. Because the chains are seeded alike, the stop_when sweep's chains are
the fixed sweep's cut short. For each, the accuracy is the share of correct final states per
prompt, averaged over prompts, with a percentile bootstrap interval over prompts; the steps
taken are the proposals stored (step 0 included).

Everything runs through the product: toy vLLM-compatible servers over HTTP, `qalign run`'s
runner, SQLite. Run: `python benchmarks/stopping.py [--quick]`; writes
benchmarks/results/stopping{,-quick}.json and prints a table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from machine import cpu_model
from sqlalchemy import func, select

from qalign.config import parse_config
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.service import StepService
from qalign.storage import ensure_schema, make_engine, make_sessionmaker
from qalign.storage.models import Chain, Prompt, Proposal, Run, Sweep
from qalign.toy.model import WORD_BASE, ToyModel
from qalign.toy.server import ToyServerOptions, serve_in_thread

OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")
MODEL = ToyModel()
YES = WORD_BASE + MODEL.words.index("yes")
BETA = 1.0
MAX_NEW = 3
SEED = 2026
BOOTSTRAP = 2000


def correct(tokens: list[int] | None) -> bool:
    return bool(tokens) and tokens[0] == YES  # type: ignore[index]


def config(name: str, gen: str, rm: str, prompts: int, chains: int, steps: int,
           stop_when: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "generator": {"urls": [gen], "model": "toy-lm"},
        "reward": {"urls": [rm], "model": "toy-rm", "format": "vllm"},
        "dataset": {"prompts": [f"question {i}: yes, no, maybe or so?" for i in range(prompts)]},
        "beta": BETA,
        "steps": steps,
        "chains_per_prompt": chains,
        "seed": SEED,
        "max_new_tokens": MAX_NEW,
        "max_prompt_length": 64,
        **({"stop_when": stop_when} if stop_when else {}),
    }


def bootstrap(values: list[float], rng: random.Random) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (resampling prompts)."""
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(BOOTSTRAP))
    return means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def summarise(sessions: Any, name: str) -> dict[str, Any]:
    """Accuracy of the final states per prompt, its interval, and the steps taken."""
    with sessions() as s:
        where = (Sweep.name == name,)
        chains = s.execute(
            select(Prompt.prompt_index, Chain.state_tokens, Chain.status, Chain.current_step)
            .join(Prompt, Prompt.id == Chain.prompt_id)
            .join(Run, Run.id == Chain.run_id)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(*where)
        ).all()
        steps = s.execute(
            select(func.count(Proposal.id))
            .join(Run, Run.id == Proposal.run_id)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(*where)
        ).scalar_one()
    per_prompt: dict[int, list[bool]] = defaultdict(list)
    retired: dict[int, int] = {}
    for prompt, tokens, status, step in chains:
        per_prompt[prompt].append(correct(tokens))
        if status == "converged":
            retired[prompt] = step
    accuracy = [sum(v) / len(v) for _, v in sorted(per_prompt.items())]
    low, high = bootstrap(accuracy, random.Random(0))
    return {
        "accuracy": sum(accuracy) / len(accuracy),
        "ci95": [low, high],
        "steps_taken": int(steps),
        "prompts_retired": len(retired),
        "retired_at": dict(sorted(retired.items())),
    }


def run(prompts: int, chains: int, steps: int, stop_when: dict[str, Any]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="qalign-stopping-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    url = f"sqlite:///{tmp}/stopping.sqlite"
    ensure_schema(url)
    sessions = make_sessionmaker(make_engine(url))
    seconds = {}
    opts = {"model": MODEL, "port": 0}
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), **opts)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), **opts)) as r,
    ):
        for name, rule in (("fixed", None), ("stop_when", stop_when)):
            cfg = config(name, g.url, r.url, prompts, chains, steps, rule)
            sweep_id, _ = create_sweep(sessions, parse_config(cfg))
            service = StepService(sessions, concurrency=64)

            async def go(service: StepService = service, sweep_id: int = sweep_id) -> None:
                try:
                    await run_locally(service, sweep_id, progress=False)
                finally:
                    await service.close()

            t0 = time.perf_counter()
            asyncio.run(go())
            seconds[name] = time.perf_counter() - t0
    fixed, stopped = summarise(sessions, "fixed"), summarise(sessions, "stop_when")
    target = sum(p for y, p in MODEL.target(BETA, MAX_NEW).items() if y and y[0] == YES)
    low, high = fixed["ci95"]
    return {
        "prompts": prompts,
        "chains_per_prompt": chains,
        "steps": steps,
        "stop_when": stop_when,
        "beta": BETA,
        "exact_target_accuracy": target,
        "fixed": fixed | {"seconds": seconds["fixed"]},
        "stop_when_run": stopped | {"seconds": seconds["stop_when"]},
        "steps_ratio": stopped["steps_taken"] / fixed["steps_taken"],
        "within_fixed_ci": low <= stopped["accuracy"] <= high,
        "cpu": cpu_model(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (CI smoke test)")
    args = ap.parse_args()
    # a terminated benchmark still removes its temp folder: atexit runs on SystemExit only
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        res = run(16, 4, 32, {"rhat": 1.1, "ess": 20, "min_steps": 8, "every": 4})
    else:
        res = run(64, 4, 96, {"rhat": 1.1, "ess": 30, "min_steps": 16, "every": 8})
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = OUT / f"stopping{suffix}.json"
    path.write_text(json.dumps(res, indent=2))
    f, s = res["fixed"], res["stop_when_run"]
    print(f"exact target accuracy {res['exact_target_accuracy']:.3f}; CPU {res['cpu']}")
    print("| sweep | accuracy | 95% CI (prompts) | steps taken | prompts retired | seconds |")
    print("|---|---|---|---|---|---|")
    for label, x in ((f"fixed {res['steps']} steps", f), (f"stop_when {res['stop_when']}", s)):
        print(
            f"| {label} | {x['accuracy']:.3f} | [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}] | "
            f"{x['steps_taken']} | {x['prompts_retired']}/{res['prompts']} | {x['seconds']:.1f} |"
        )
    print(
        f"steps ratio {res['steps_ratio']:.2f}; stop_when accuracy within the fixed CI: "
        f"{res['within_fixed_ci']}; wrote {path}"
    )


if __name__ == "__main__":
    main()
