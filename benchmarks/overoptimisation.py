"""Best-of-n over-optimises an imperfect reward; QAlign converges to the exact target.

A toy task on the toy servers: the answer is the first word of the response and "yes" is
correct. The reward model is a proxy: it mostly prefers "yes" (per-word values), but it has a
blind spot, a large bonus for the rare response "so so so" (wrong). Best-of-n finds that response
once n is large enough and its accuracy falls; QAlign samples p_LM(y)·exp(r/β), where the rare
response keeps a small mass, so its accuracy rises with steps to the exact target's.

Everything runs through the product: toy vLLM-compatible servers over HTTP, `qalign run`'s
runner, SQLite. Run: `python benchmarks/overoptimisation.py [--quick]`; writes
benchmarks/results/overoptimisation.{json,png} and prints a table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sqlalchemy import select

from qalign.config import parse_config
from qalign.core import KernelConfig, majority_vote
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.service import StepService
from qalign.storage import ensure_schema, make_engine, make_sessionmaker
from qalign.storage.models import Chain, Proposal, Run, Sweep
from qalign.storage.replay import replay
from qalign.toy.exact import step_distribution, transition_matrix
from qalign.toy.model import EOS, WORD_BASE, ToyModel
from qalign.toy.server import ToyServerOptions, serve_in_thread

OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")
MAX_NEW = 3
BETA = 1.0
HACK = ("so", "so", "so")
MODEL = ToyModel(bonus={HACK: 4.0})
YES = WORD_BASE + MODEL.words.index("yes")


def correct(tokens: tuple[int, ...]) -> bool:
    return bool(tokens) and tokens[0] == YES


def exact_bon_accuracy(n: int) -> float:
    """P(the best of n LM samples is correct); ties go to a uniformly random tied sample."""
    lm = MODEL.lm_distribution(MAX_NEW)
    levels: dict[float, list[tuple[float, bool]]] = defaultdict(list)
    for y, p in lm.items():
        levels[round(MODEL.reward(y), 9)].append((p, correct(y)))
    acc, below = 0.0, 0.0
    for r in sorted(levels):
        mass = sum(p for p, _ in levels[r])
        good = sum(p for p, ok in levels[r] if ok)
        top = (below + mass) ** n - below**n  # P(max reward level == r)
        acc += top * good / mass
        below += mass
    return acc


def exact_target_accuracy() -> float:
    return sum(p for y, p in MODEL.target(BETA, MAX_NEW).items() if correct(y))


def exact_qalign_accuracy(steps: int) -> dict[int, float]:
    """Accuracy of a chain's state after k steps, from the exact transition kernel."""
    law = MODEL.lm_distribution(MAX_NEW)
    matrix = transition_matrix(MODEL, KernelConfig(beta=BETA, max_new_tokens=MAX_NEW))
    out = {}
    for k in range(steps + 1):
        out[k] = sum(p for y, p in law.items() if correct(y))
        law = step_distribution(law, matrix, 1)
    return out


def exact_lm_accuracy() -> float:
    return sum(p for y, p in MODEL.lm_distribution(MAX_NEW).items() if correct(y))


def config(name: str, method: str, gen: str, rm: str, chains: int, steps: int) -> dict:
    return {
        "name": name,
        "method": method,
        "generator": {"urls": [gen], "model": "toy-lm"},
        "reward": {"urls": [rm], "model": "toy-rm", "format": "vllm"},
        "dataset": {"prompts": ["Answer yes, no, maybe or so."]},
        "beta": BETA,
        **({"steps": steps} if method != "ancestral" else {}),
        "chains_per_prompt": chains,
        "seed": 2026,
        "max_new_tokens": MAX_NEW,
        "max_prompt_length": 64,
    }


def run(samples: int, chains: int, steps: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="qalign-overopt-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    url = f"sqlite:///{tmp}/overopt.sqlite"
    ensure_schema(url)
    sessions = make_sessionmaker(make_engine(url))
    opts = {"model": MODEL, "port": 0}
    t0 = time.perf_counter()
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), **opts)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), **opts)) as r,
    ):
        for cfg in (
            config("bon", "ancestral", g.url, r.url, samples, 0),
            config("qalign", "qalign", g.url, r.url, chains, steps),
        ):
            sweep_id, _ = create_sweep(sessions, parse_config(cfg))
            services = StepService(sessions, concurrency=128)

            async def go(services: StepService = services, sweep_id: int = sweep_id) -> None:
                try:
                    await run_locally(services, sweep_id, progress=False)
                finally:
                    await services.close()

            asyncio.run(go())
    elapsed = time.perf_counter() - t0

    with sessions() as s:

        def rows(name: str) -> list:
            return s.execute(
                select(
                    Proposal.chain_id,
                    Proposal.step,
                    Proposal.cut,
                    Proposal.new_tokens,
                    Proposal.accepted,
                    Proposal.reward,
                )
                .join(Run, Run.id == Proposal.run_id)
                .join(Sweep, Sweep.id == Run.sweep_id)
                .where(Sweep.name == name)
            ).all()

        bon_rows = rows("bon")
        qalign_rows = rows("qalign")
        n_chains = len(s.execute(select(Chain.id)).all())

    pool = [(tuple(new), reward) for _, _, _, new, _, reward in bon_rows]
    rng = random.Random(0)
    budgets = [2**k for k in range(0, 14) if 2**k <= samples]
    bon_mc = {}
    for n in budgets:
        trials = 400
        hits = 0
        for _ in range(trials):
            sub = rng.sample(pool, n)
            best = max(range(n), key=lambda i: (sub[i][1], -i))
            hits += correct(sub[best][0])
        bon_mc[n] = hits / trials

    by_chain: dict[int, list] = defaultdict(list)
    for cid, step, cut, new, acc, _ in qalign_rows:
        by_chain[cid].append((step, cut, new, acc))
    per_step = [0] * (steps + 1)
    per_step_mv = [0] * (steps + 1)
    for props in by_chain.values():
        answers: list[int | None] = []
        for rec in replay(props):
            per_step[rec.step] += correct(rec.state)
            answers.append(rec.state[0] if rec.state and rec.state[0] != EOS else None)
            per_step_mv[rec.step] += majority_vote(answers) == YES
    qalign_acc = {k: per_step[k] / len(by_chain) for k in range(steps + 1)}
    qalign_mv = {k: per_step_mv[k] / len(by_chain) for k in range(steps + 1)}
    return {
        "samples": samples,
        "chains": chains,
        "steps": steps,
        "beta": BETA,
        "seconds": elapsed,
        "stored_chains": n_chains,
        "lm_accuracy": exact_lm_accuracy(),
        "target_accuracy": exact_target_accuracy(),
        "bon_exact": {n: exact_bon_accuracy(n) for n in budgets},
        "bon_monte_carlo": bon_mc,
        "qalign_by_step": qalign_acc,
        "qalign_exact_by_step": exact_qalign_accuracy(steps),
        "qalign_majority_vote_by_step": qalign_mv,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ns = [int(n) for n in res["bon_exact"]]
    ax.plot(ns, list(res["bon_exact"].values()), "-", color="#e41a1c", label="best-of-n (exact)")
    ax.plot(ns, list(res["bon_monte_carlo"].values()), "o", color="#e41a1c", ms=4,
            label="best-of-n (sampled, stored pool)")  # fmt: skip
    steps = [int(k) for k in res["qalign_by_step"]]
    budget = [k + 1 for k in steps]  # step k has cost k + 1 generations
    ax.plot(budget, list(res["qalign_by_step"].values()), "o", color="#ff7f00", ms=2,
            label=f"QAlign state (β={res['beta']:g}, sampled)")  # fmt: skip
    ax.plot(budget, list(res["qalign_exact_by_step"].values()), "-", color="#ff7f00",
            label="QAlign state (exact kernel)")  # fmt: skip
    ax.plot(budget, list(res["qalign_majority_vote_by_step"].values()), "-", color="#984ea3",
            label="QAlign + majority vote over the chain's states")  # fmt: skip
    ax.axhline(res["target_accuracy"], ls="--", color="#ff7f00", lw=1, label="exact target")
    ax.axhline(res["lm_accuracy"], ls=":", color="grey", lw=1, label="LM sample")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generations per prompt (n for best-of-n, step + 1 for QAlign)")
    ax.set_ylabel("accuracy of the selected response")
    ax.set_title("Imperfect reward: best-of-n over-optimises, QAlign converges")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (CI smoke test)")
    args = ap.parse_args()
    samples, chains, steps = (512, 64, 16) if args.quick else (8192, 128, 256)
    res = run(samples, chains, steps)
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (OUT / f"overoptimisation{suffix}.json").write_text(json.dumps(res, indent=2))
    plot(res, OUT / f"overoptimisation{suffix}.png")
    print(
        f"LM accuracy {res['lm_accuracy']:.3f}; exact target accuracy {res['target_accuracy']:.3f}"
    )
    print(
        "| n | best-of-n exact | best-of-n sampled | QAlign state, n-1 steps (exact) | QAlign MV |"
    )
    print("|---|---|---|---|---|")
    for n in res["bon_exact"]:
        q = res["qalign_by_step"].get(int(n) - 1)
        qe = res["qalign_exact_by_step"].get(int(n) - 1)
        mv = res["qalign_majority_vote_by_step"].get(int(n) - 1)
        state = "-" if q is None else f"{q:.3f} ({qe:.3f})"
        vote = "-" if mv is None else f"{mv:.3f}"
        print(
            f"| {n} | {res['bon_exact'][n]:.3f} | {res['bon_monte_carlo'][n]:.3f} | "
            f"{state} | {vote} |"
        )
    print(f"elapsed {res['seconds']:.1f}s; wrote {OUT}/overoptimisation{suffix}.json and .png")


if __name__ == "__main__":
    main()
