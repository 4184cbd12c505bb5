"""Token efficiency (issue 5, item 5): reward cache and prefix-cache affinity.

Runs one sweep through `qalign run`'s runner against TWO toy generator replicas and one toy
reward model, then reports (a) how many reward evaluations the cache avoided (identical
proposals are scored once per process) and (b) the share of each chain's steps that went to the
chain's own replica (rendezvous hashing pins a chain to one replica, so the server's prefix cache
holds its prompt and prefixes).

Run: `python benchmarks/token_efficiency.py [--quick]`; writes
benchmarks/results/token_efficiency[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from sqlalchemy import select

from qalign.clients.cache import CachedReward
from qalign.config import parse_config
from qalign.scheduler.local import run_locally
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.service import StepService
from qalign.storage import ensure_schema, make_engine, make_sessionmaker
from qalign.storage.models import Proposal
from qalign.toy.server import ToyServerOptions, serve_in_thread

OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    chains, steps, max_new = (32, 8, 6) if args.quick else (128, 30, 6)
    tmp = tempfile.mkdtemp(prefix="qalign-tokeff-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    url = f"sqlite:///{tmp}/t.sqlite"
    ensure_schema(url)
    sessions = make_sessionmaker(make_engine(url))
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g1,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g2,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as rm,
    ):
        cfg = parse_config(
            {
                "name": "tokeff",
                "generator": {"urls": [g1.url, g2.url], "model": "toy-lm"},
                "reward": {"urls": [rm.url], "model": "toy-rm", "format": "vllm"},
                "dataset": {"prompts": ["Answer yes or no.", "Say maybe."]},
                "beta": 1.0,
                "steps": steps,
                "chains_per_prompt": chains // 2,
                "max_new_tokens": max_new,
                "max_prompt_length": 64,
            }
        )
        sweep_id, _ = create_sweep(sessions, cfg)
        services = StepService(sessions)

        async def go() -> tuple[int, int]:
            try:
                await run_locally(services, sweep_id, progress=False)
                cached = [
                    c for c in services.clients._items.values() if isinstance(c, CachedReward)
                ]
                return cached[0].hits, cached[0].misses
            finally:
                await services.close()

        hits, misses = asyncio.run(go())
        per_replica = {g1.url: g1.metrics(), g2.url: g2.metrics()}
    with sessions() as s:
        rows = s.execute(select(Proposal.chain_id, Proposal.endpoint)).all()
    by_chain: dict[int, Counter[str]] = defaultdict(Counter)
    for cid, endpoint in rows:
        by_chain[cid][endpoint] += 1
    own = sum(c.most_common(1)[0][1] for c in by_chain.values())
    total = sum(sum(c.values()) for c in by_chain.values())
    chains_per_replica = Counter(c.most_common(1)[0][0] for c in by_chain.values())
    res = {
        "chains": chains,
        "steps": steps,
        "reward_requests_needed": hits + misses,
        "reward_evaluations_made": misses,
        "reward_cache_hit_rate": hits / (hits + misses),
        "share_of_steps_on_own_replica": own / total,
        "chains_per_replica": dict(chains_per_replica),
        "completions_per_replica": {
            u: m["requests"].get("/v1/completions", 0) for u, m in per_replica.items()
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"token_efficiency{'-quick' if args.quick else ''}.json").write_text(
        json.dumps(res, indent=2)
    )
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
