"""Real-server saturation (issue 5, item 6): QAlign's generated tokens/s on real vLLM (CPU,
SmolLM2-135M) as a share of what the same server delivers to a plain load generator.

Both sides send the SAME server-side work at the SAME concurrency, back to back:

* `qalign`   -- `qalign run CONFIG` (SQLite, embedded runner): GSM8K prompts, N chains x K steps.
  Each step is one `/v1/completions` on exact token ids, one `/detokenize` on the generator, and
  (unless the reward cache already knows the conversation) `/tokenize` + `/classify` on the
  reward server.
* `loadgen`  -- this file's `--replay` mode, a separate process with nothing but aiohttp: the
  requests the sweep made are rebuilt from its database (prompt encoding + the chain's state
  before the step, cut at the stored cut; `max_tokens = max_new_tokens - cut`; the stored seed;
  the client's own request body builder so every sampling field is identical), then sent by
  `concurrency` workers, each doing a step's four calls in order. No database, no MCMC, no
  dependency between requests: a queue that never runs dry is the server's best case.
* `loadgen-gen` -- the same replay with the generation requests only (the reward server idles),
  which shows how much the reward model's share of the two cores costs.

Throughput is the generated tokens (`proposals.gen_tokens`, resp. the token ids returned) of the
steps completing between the 10 % and the 90 % completion marks, over the time between those
marks, so start-up and the tail are excluded on both sides. ratio = qalign / loadgen.

The generator's `/metrics` is sampled every second during each measurement, so the JSON shows the
server's own view (mean running / waiting requests, its generation-token counter) too. Client CPU
seconds come from the child processes' rusage: on a 2-core box the client competes with the
servers for the same cores.

Servers: `scripts/real-servers/start.sh vllm` (generator :8000, reward model :8001); reused when
both already answer `/health` (and then left running), otherwise started and stopped again.

Run: `.venv/bin/python benchmarks/real_vllm.py [--quick]`; prints a Markdown table and writes
benchmarks/results/real_vllm[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or Path(__file__).resolve().parent / "results")
SCRIPTS = ROOT / "scripts" / "real-servers"
QALIGN = [sys.executable, "-m", "qalign.cli"]
HOST = os.environ.get("QALIGN_REALSRV_HOST", "127.0.0.1")
GEN_URL = f"http://{HOST}:{os.environ.get('QALIGN_GEN_PORT', '8000')}"
RM_URL = f"http://{HOST}:{os.environ.get('QALIGN_RM_PORT', '8001')}"
GEN_MODEL = "smollm2"
RM_MODEL = "smollm2-rm"
DATA = ROOT.parent / "shared" / "data" / "gsm8k"
TEMPERATURE = 1.0
# Proposals the kernel rejected before scoring: no /detokenize and no reward call was made.
UNSCORED = {"empty_continuation", "over_budget", "early_length_stop", "missing_logprobs"}


# ------------------------------------------------------------------------------------------------
# servers


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _script(name: str) -> None:
    p = subprocess.run(
        ["bash", str(SCRIPTS / name), "vllm"], capture_output=True, text=True, timeout=900
    )
    print(p.stdout.rstrip(), flush=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} vllm failed:\n{p.stdout}\n{p.stderr}")


@contextlib.contextmanager
def vllm_servers() -> Iterator[bool]:
    """Yield whether the servers were already running (then they are left running)."""
    if healthy(GEN_URL) and healthy(RM_URL):
        print(f"reusing running servers at {GEN_URL} and {RM_URL}", flush=True)
        yield True
        return
    try:
        _script("start.sh")
        yield False
    finally:
        _script("stop.sh")


class MetricsSampler:
    """Polls the generator's Prometheus /metrics once a second in a thread."""

    GAUGES = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for name in self.GAUGES:
            # one series per served model name/engine: sum them
            vals = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
            out[name] = sum(float(v) for v in vals)
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.time(), self._read()))
            self._stop.wait(1.0)

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        inside = [s for t, s in self.samples if t0 <= t <= t1]
        if len(inside) < 2:
            return {"mean_running": None, "mean_waiting": None, "server_gen_tokens_per_s": None}
        (ta, a), (tb, b) = (
            next((t, s) for t, s in self.samples if t >= t0),
            next((t, s) for t, s in reversed(self.samples) if t <= t1),
        )
        gen = "vllm:generation_tokens_total"
        return {
            "mean_running": statistics.fmean(s["vllm:num_requests_running"] for s in inside),
            "mean_waiting": statistics.fmean(s["vllm:num_requests_waiting"] for s in inside),
            "server_gen_tokens_per_s": (b[gen] - a[gen]) / (tb - ta) if tb > ta else None,
        }


# ------------------------------------------------------------------------------------------------
# shared measurement


def steady_state(done: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Generated tokens/s between the 10 % and 90 % completion marks (epoch seconds, tokens)."""
    rows = sorted(done)
    n = len(rows)
    lo, hi = int(0.1 * n), int(0.9 * n) - 1
    secs = rows[hi][0] - rows[lo][0]
    tokens = sum(r[1] for r in rows[lo + 1 : hi + 1])  # completions after the first mark
    return {
        "steps_total": n,
        "window_steps": hi - lo,
        "window_seconds": secs,
        "window_start": rows[lo][0],
        "window_end": rows[hi][0],
        "gen_tokens_per_s": tokens / secs,
        "steps_per_s": (hi - lo) / secs,
        "mean_gen_tokens": tokens / max(1, hi - lo),
        "wall_seconds_all": rows[-1][0] - rows[0][0],
    }


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------------------
# the sweep (ours)


def sweep_config(
    name: str, n_prompts: int, chains: int, steps: int, max_new: int, concurrency: int
) -> dict[str, Any]:
    return {
        "name": name,
        "method": "qalign",
        "generator": {"urls": [GEN_URL], "model": GEN_MODEL, "timeout": 900, "max_retries": 4},
        "reward": {"urls": [RM_URL], "model": RM_MODEL, "format": "vllm", "timeout": 900},
        "dataset": {"task": "gsm8k", "path": str(DATA), "limit": n_prompts},
        "beta": 1.0,
        "temperature": TEMPERATURE,
        "steps": steps,
        "chains_per_prompt": chains,
        "seed": 11,
        "max_new_tokens": max_new,
        "max_prompt_length": 512,
        "execution": {"concurrency": concurrency},
    }


def run_sweep(tmp: Path, cfg: dict[str, Any], concurrency: int) -> tuple[str, dict[str, Any]]:
    import yaml

    url = f"sqlite:///{tmp}/real.sqlite"
    path = tmp / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    conc = str(concurrency)
    cpu0, t0 = child_cpu(), time.perf_counter()
    with MetricsSampler(GEN_URL) as metrics:
        p = subprocess.run(
            [*QALIGN, "run", str(path), "--database", url, "--quiet", "--concurrency", conc],
            capture_output=True,
            text=True,
            timeout=3600,
            cwd=ROOT,
        )
    if p.returncode != 0:
        raise RuntimeError(f"qalign run failed:\n{p.stdout}\n{p.stderr[-5000:]}")
    done = [(t.timestamp(), n) for t, n in db_rows(url, "created_at", "gen_tokens")]
    res = steady_state(done)
    res["command_seconds"] = time.perf_counter() - t0
    res["client_cpu_seconds"] = child_cpu() - cpu0
    res["server"] = metrics.window(res["window_start"], res["window_end"])
    return url, res


def db_rows(url: str, *cols: str) -> list[tuple[Any, ...]]:
    from sqlalchemy import select

    from qalign.storage.engine import make_engine, make_sessionmaker
    from qalign.storage.models import Proposal

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            return [tuple(r) for r in s.execute(select(*(getattr(Proposal, c) for c in cols)))]
    finally:
        engine.dispose()


def export_requests(url: str, max_new: int) -> list[dict[str, Any]]:
    """Every step's server calls, rebuilt from the stored chains, in commit order."""
    from sqlalchemy import select

    from qalign.clients.base import SamplingParams
    from qalign.clients.vllm import VLLMGenerator
    from qalign.storage.engine import make_engine, make_sessionmaker
    from qalign.storage.models import Chain, Prompt, PromptEncoding, Proposal

    builder = VLLMGenerator(GEN_URL, GEN_MODEL)  # only for its request-body builder
    params = SamplingParams(temperature=TEMPERATURE)
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            enc = {
                pid: list(ids)
                for pid, ids in s.execute(
                    select(PromptEncoding.prompt_id, PromptEncoding.token_ids)
                )
            }
            msgs = {pid: m for pid, m in s.execute(select(Prompt.id, Prompt.messages))}
            chain_prompt = {cid: pid for cid, pid in s.execute(select(Chain.id, Chain.prompt_id))}
            props = s.execute(select(Proposal).order_by(Proposal.chain_id, Proposal.step)).scalars()
            items: list[tuple[Any, dict[str, Any]]] = []
            state: dict[int, list[int]] = {}
            for p in props:
                prefix = state.get(p.chain_id, [])[: p.cut] if p.step > 0 else []
                pid = chain_prompt[p.chain_id]
                body = builder._body(
                    enc[pid] + prefix,
                    max_tokens=max_new - p.cut,
                    seed=p.gen_seed,
                    params=params,
                    logprobs=False,
                    mode="token_ids",
                )
                response = prefix + list(p.new_tokens)
                scored = p.step == 0 or p.reject_reason not in UNSCORED
                text_ids = response[:-1] if p.finish == "stop" else response
                item: dict[str, Any] = {
                    "gen": body,
                    "stored_tokens": list(p.new_tokens),
                    "detok": {"model": GEN_MODEL, "tokens": text_ids} if scored else None,
                    "conversation": (
                        [*msgs[pid], {"role": "assistant", "content": p.text}] if scored else None
                    ),
                }
                if p.step == 0 or p.accepted:
                    state[p.chain_id] = response
                items.append((p.created_at, item))
    finally:
        engine.dispose()
    items.sort(key=lambda x: x[0])
    out = [it for _, it in items]
    # The runner's reward cache scores each distinct conversation once per process.
    seen: set[str] = set()
    for it in out:
        conv = it.pop("conversation")
        key = json.dumps(conv, sort_keys=True) if conv is not None else None
        it["rm_tokenize"] = None
        if key is not None and key not in seen:
            seen.add(key)
            it["rm_tokenize"] = {
                "model": RM_MODEL,
                "messages": conv,
                "add_generation_prompt": False,
                "add_special_tokens": False,
            }
    return out


# ------------------------------------------------------------------------------------------------
# the load generator (a separate process: `--replay`)


async def replay(items: list[dict[str, Any]], concurrency: int, gen_only: bool) -> dict[str, Any]:
    import aiohttp

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)
    done: list[tuple[float, int]] = []
    same = 0
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:

        async def post(url: str, body: dict[str, Any]) -> Any:
            async with http.post(url, json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:500]}")
                return await r.json()

        async def worker() -> None:
            nonlocal same
            while True:
                try:
                    it = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                reply = await post(f"{GEN_URL}/v1/completions", it["gen"])
                ids = reply["choices"][0]["token_ids"]
                same += ids == it["stored_tokens"]
                if not gen_only:
                    if it["detok"] is not None:
                        await post(f"{GEN_URL}/detokenize", it["detok"])
                    if it["rm_tokenize"] is not None:
                        tok = await post(f"{RM_URL}/tokenize", it["rm_tokenize"])
                        body = {
                            "model": RM_MODEL,
                            "input": [tok["tokens"]],
                            "use_activation": False,
                        }
                        await post(f"{RM_URL}/classify", body)
                done.append((time.time(), len(ids)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"done": done, "same_tokens_as_sweep": same}


def replay_main(path: Path, out: Path, concurrency: int, gen_only: bool) -> None:
    items = json.loads(path.read_text())
    out.write_text(json.dumps(asyncio.run(replay(items, concurrency, gen_only))))


def run_replay(tmp: Path, items_path: Path, concurrency: int, gen_only: bool) -> dict[str, Any]:
    out = tmp / f"replay-{'gen' if gen_only else 'full'}.json"
    cmd = [sys.executable, __file__, "--replay", str(items_path), "--replay-out", str(out)]
    cmd += ["--concurrency", str(concurrency)] + (["--replay-gen-only"] if gen_only else [])
    cpu0, t0 = child_cpu(), time.perf_counter()
    with MetricsSampler(GEN_URL) as metrics:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"replay failed:\n{p.stdout}\n{p.stderr[-5000:]}")
    raw = json.loads(out.read_text())
    res = steady_state([tuple(x) for x in raw["done"]])
    res["command_seconds"] = time.perf_counter() - t0
    res["client_cpu_seconds"] = child_cpu() - cpu0
    res["same_tokens_as_sweep"] = raw["same_tokens_as_sweep"]
    res["server"] = metrics.window(res["window_start"], res["window_end"])
    return res


# ------------------------------------------------------------------------------------------------


def canonical(items: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(it, sort_keys=True) for it in items)


def one_rep(
    rep: int, args: argparse.Namespace, previous: Path | None
) -> tuple[dict[str, Any], Path]:
    """One paired measurement. Every rep's sweep has the same config and seed, so it sends the
    same requests (vLLM's seeded sampling reproduces the tokens); odd reps therefore replay the
    previous rep's requests BEFORE their sweep, which cancels a linear drift of the box's load."""
    tmp = Path(tempfile.mkdtemp(prefix="qalign-realvllm-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # leave no temp files
    cfg = sweep_config(
        "real-sat", args.prompts, args.chains, args.steps, args.max_new_tokens, args.concurrency
    )
    replay_first = previous is not None and rep % 2 == 1
    if replay_first and previous is not None:
        full = run_replay(tmp, previous, args.concurrency, gen_only=False)
    url, ours = run_sweep(tmp, cfg, args.concurrency)
    items = export_requests(url, args.max_new_tokens)
    items_path = tmp / "requests.json"
    items_path.write_text(json.dumps(items))
    identical = None
    if replay_first and previous is not None:
        # as a multiset: commit order varies with timing, the requests themselves do not
        identical = canonical(json.loads(previous.read_text())) == canonical(items)
    else:
        full = run_replay(tmp, items_path, args.concurrency, gen_only=False)
    gen = run_replay(tmp, items_path, args.concurrency, gen_only=True) if args.gen_only else None
    shape = {
        "steps": len(items),
        "reward_calls": sum(it["rm_tokenize"] is not None for it in items),
        "detokenize_calls": sum(it["detok"] is not None for it in items),
        "mean_prompt_tokens": statistics.fmean(len(it["gen"]["prompt"]) for it in items),
        "mean_max_tokens": statistics.fmean(it["gen"]["max_tokens"] for it in items),
    }
    r = {
        "order": "loadgen, qalign" if replay_first else "qalign, loadgen",
        "replayed_requests_identical": identical,
        "qalign": ours,
        "loadgen": full,
        "loadgen_gen_only": gen,
        "requests": shape,
        "ratio": ours["gen_tokens_per_s"] / full["gen_tokens_per_s"],
        "ratio_vs_gen_only": ours["gen_tokens_per_s"] / gen["gen_tokens_per_s"] if gen else None,
    }
    print(
        f"  rep {rep} ({r['order']}): qalign {ours['gen_tokens_per_s']:6.1f} tok/s | loadgen "
        f"{full['gen_tokens_per_s']:6.1f} tok/s | ratio {r['ratio']:.3f}"
        + (f" | gen-only {gen['gen_tokens_per_s']:6.1f} tok/s" if gen else "")
        + f" | {shape['steps']} steps, {shape['reward_calls']} reward calls",
        flush=True,
    )
    return r, items_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small repetition (~2-3 min)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--chains", type=int, default=None, help="chains per prompt")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--no-gen-only", dest="gen_only", action="store_false", help="skip the generation-only run"
    )
    # internal: the load generator's own process
    ap.add_argument("--replay", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--replay-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--replay-gen-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replay:
        replay_main(args.replay, args.replay_out, args.concurrency, args.replay_gen_only)
        return
    reps = args.reps or (1 if args.quick else 3)
    # Sized for a busy 2-core box, where both servers reach ~15-70 generated tok/s.
    args.chains = args.chains or (4 if args.quick else 6)
    args.steps = args.steps or (2 if args.quick else 3)
    started = time.perf_counter()
    with vllm_servers() as reused:
        runs: list[dict[str, Any]] = []
        previous: Path | None = None
        for i in range(reps):
            r, previous = one_rep(i, args, previous)
            runs.append(r)

    def med(f: Any) -> float | None:
        vals = [v for v in (f(r) for r in runs) if v is not None]
        return statistics.median(vals) if vals else None

    summary = {
        "qalign_gen_tokens_per_s": med(lambda r: r["qalign"]["gen_tokens_per_s"]),
        "loadgen_gen_tokens_per_s": med(lambda r: r["loadgen"]["gen_tokens_per_s"]),
        "loadgen_gen_only_gen_tokens_per_s": med(
            lambda r: r["loadgen_gen_only"] and r["loadgen_gen_only"]["gen_tokens_per_s"]
        ),
        "ratio": med(lambda r: r["ratio"]),
        "ratio_vs_gen_only": med(lambda r: r["ratio_vs_gen_only"]),
        "qalign_client_cpu_s_per_step": med(
            lambda r: r["qalign"]["client_cpu_seconds"] / r["qalign"]["steps_total"]
        ),
        "loadgen_client_cpu_s_per_step": med(
            lambda r: r["loadgen"]["client_cpu_seconds"] / r["loadgen"]["steps_total"]
        ),
    }
    doc = {
        "benchmark": "real vLLM saturation (issue 5 item 6)",
        "command": "python benchmarks/real_vllm.py" + (" --quick" if args.quick else ""),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "servers": "vLLM 0.32 CPU, SmolLM2-135M-Instruct fp32 (generator) + SmolLM2-135M RM",
        "servers_reused": reused,
        "prompts": args.prompts,
        "chains_per_prompt": args.chains,
        "steps": args.steps,
        "max_new_tokens": args.max_new_tokens,
        "concurrency": args.concurrency,
        "reps": reps,
        "window": "10%..90% completion marks (proposals.created_at / replay completion times)",
        "elapsed_seconds": time.perf_counter() - started,
        "summary": summary,
        "runs": runs,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"real_vllm{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=2))

    def fmt(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    print()
    print("| client | generated tok/s | steps/s | client CPU s/step | ratio (qalign / this) |")
    print("|---|---|---|---|---|")
    for label, key, rkey in (
        ("qalign run (SQLite)", "qalign", None),
        ("load generator, same requests + reward calls", "loadgen", "ratio"),
        ("load generator, generation only", "loadgen_gen_only", "ratio_vs_gen_only"),
    ):
        if runs[0][key] is None:
            continue
        tok = med(lambda r, k=key: r[k]["gen_tokens_per_s"])
        sps = med(lambda r, k=key: r[k]["steps_per_s"])
        cpu = med(lambda r, k=key: r[k]["client_cpu_seconds"] / r[k]["steps_total"])
        ratio = summary[rkey] if rkey else None
        cells = [label, fmt(tok), fmt(sps, ".2f"), fmt(cpu, ".3f"), fmt(ratio, ".2f")]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\n{args.prompts} GSM8K prompts x {args.chains} chains x {args.steps} steps (+ initial "
        f"sample), max_new_tokens {args.max_new_tokens}, concurrency {args.concurrency}, median "
        f"of {reps}; {doc['elapsed_seconds']:.0f} s total; wrote {path}"
    )


if __name__ == "__main__":
    main()
