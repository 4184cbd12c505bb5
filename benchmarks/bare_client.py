"""The bare client: QAlign chains as a minimal aiohttp loop, the baseline for client overhead.

It makes the requests an exact QAlign step needs and nothing else: one `/v1/completions` on
exact token ids (prompt + kept prefix), one `/detokenize` of the new response (the reward
model reads text, and text must be a function of the token ids), one `/classify` with the
conversation as `messages`, on every step. It caches nothing, persists nothing, retries
nothing, keeps no per-step records beyond counters, and draws its randomness from
`random.Random`: a step's client cost is HTTP and JSON only. (`qalign run` skips requests it
does not need: a response it has seen is not detokenized or scored again; the benchmark
reports the requests per step of each client beside its throughput.)

Run: `python benchmarks/bare_client.py --gen URL --rm URL [--chains 256 --steps 8 ...]`;
prints one JSON object (steps, seconds, requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from typing import Any

import aiohttp
import orjson


class BareChains:
    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession) -> None:
        self.a = args
        self.s = session
        self.limit = asyncio.Semaphore(args.concurrency)
        self.requests = 0
        self.steps = 0
        self.accepted = 0

    async def post(self, url: str, body: dict[str, Any]) -> Any:
        self.requests += 1
        async with self.s.post(url, data=orjson.dumps(body), headers=_JSON) as r:
            r.raise_for_status()
            return orjson.loads(await r.read())

    async def generate(self, ids: list[int], max_tokens: int, seed: int) -> tuple[list[int], bool]:
        body = {
            "model": self.a.gen_model,
            "prompt": ids,
            "max_tokens": max_tokens,
            "n": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "min_tokens": 0,
            "ignore_eos": False,
            "seed": seed,
            "stream": False,
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        choice = (await self.post(self.a.gen + "/v1/completions", body))["choices"][0]
        return list(choice["token_ids"]), choice["finish_reason"] == "stop"

    async def score(self, tokens: list[int], stopped: bool) -> tuple[str, float]:
        text_ids = tokens[:-1] if stopped else tokens
        detok = {"model": self.a.gen_model, "tokens": text_ids}
        text = (await self.post(self.a.gen + "/detokenize", detok))["prompt"]
        messages = [*self.messages, {"role": "assistant", "content": text}]
        body = {"model": self.a.rm_model, "messages": messages, "use_activation": False}
        reward = (await self.post(self.a.rm + "/classify", body))["data"][0]["probs"][0]
        return text, float(reward)

    async def chain(self, k: int) -> None:
        rng = random.Random(self.a.seed * 1_000_003 + k)
        async with self.limit:
            y, stopped = await self.generate(
                self.prompt, self.a.max_new_tokens, rng.getrandbits(62)
            )
            _, r = await self.score(y, stopped)
        self.steps += 1
        for _ in range(self.a.steps):
            cut = rng.randrange(len(y))
            async with self.limit:
                new, new_stopped = await self.generate(
                    self.prompt + y[:cut], self.a.max_new_tokens - cut, rng.getrandbits(62)
                )
                proposal = y[:cut] + new
                _, r2 = await self.score(proposal, new_stopped)
            self.steps += 1
            log_a = (r2 - r) / self.a.beta + math.log(len(y) / len(proposal))
            if math.isfinite(r2) and (log_a >= 0 or rng.random() < math.exp(log_a)):
                y, stopped, r = proposal, new_stopped, r2
                self.accepted += 1

    async def run(self) -> dict[str, Any]:
        self.messages = [{"role": "user", "content": self.a.prompt}]
        tok = {"model": self.a.gen_model, "messages": self.messages, "add_generation_prompt": True}
        t0 = time.perf_counter()
        self.prompt = list((await self.post(self.a.gen + "/tokenize", tok))["tokens"])
        await asyncio.gather(*(self.chain(k) for k in range(self.a.chains)))
        seconds = time.perf_counter() - t0
        return {
            "steps": self.steps,
            "seconds": seconds,
            "steps_per_s": self.steps / seconds,
            "requests": self.requests,
            "acceptance": self.accepted / max(1, self.steps - self.a.chains),
        }


_JSON = {"Content-Type": "application/json"}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        return await BareChains(args, session).run()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gen", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--gen-model", default="toy-lm")
    ap.add_argument("--rm-model", default="toy-rm")
    ap.add_argument("--prompt", default="Answer yes or no.")
    ap.add_argument("--chains", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=7)
    return ap.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main_async(parse()))))
