"""Exactness through the whole HTTP path: vLLM clients against the toy server.

Same checks as test_exactness.py (empirical law after k steps vs the exact k-step law), but every
proposal travels through `VLLMGenerator` / `VLLMReward` and the toy server's /v1/completions,
/detokenize, /tokenize and /classify, with QUEST reading the server's logprobs.
"""

from __future__ import annotations

import asyncio

import pytest

from qalign.clients import SamplingParams, VLLMGenerator, VLLMReward, close_sessions
from qalign.core import KernelConfig, Method, kernel_config
from qalign.sampling.local import run_chains
from qalign.sampling.step import ChainSpec, ancestral_spec, initial_step
from qalign.toy.exact import (
    empirical,
    step_distribution,
    total_variation,
    transition_matrix,
    tv_bound,
)
from qalign.toy.model import ToyModel
from qalign.toy.server import ToyServerOptions, serve_in_thread

MODEL = ToyModel()
MAX_NEW = 3
MESSAGES = [{"role": "user", "content": "Answer yes or no."}]


@pytest.fixture(scope="module")
def toy_urls():
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
    ):
        yield g.url, r.url


async def _clients(urls):
    gen = VLLMGenerator(urls[0], "toy-lm")
    rm = VLLMReward(urls[1], "toy-rm")
    await gen.start()
    await rm.start()
    return gen, rm


@pytest.mark.parametrize(
    ("method", "beta", "temperature"),
    [
        (Method.QALIGN, 1.0, 1.0),
        (Method.QALIGN, 0.5, 1.0),
        (Method.QUEST, 1.0, 1.0),
        (Method.QUEST, 2.0, 0.7),
    ],
)
def test_http_chains_match_the_exact_k_step_law(toy_urls, method, beta, temperature):
    n, k = 800, 6
    cfg = KernelConfig(beta=beta, max_new_tokens=MAX_NEW, method=method)

    async def go():
        gen, rm = await _clients(toy_urls)
        prompt = tuple(await gen.chat_prompt(MESSAGES))
        specs = [
            ChainSpec(f"h{i}", 99, prompt, MESSAGES, cfg, SamplingParams(temperature=temperature))
            for i in range(n)
        ]
        try:
            return await run_chains(specs, k, gen, rm, concurrency=128)
        finally:
            await close_sessions()

    runs = asyncio.run(go())
    assert all(len(r) == k + 1 for r in runs)
    final = empirical([r[-1].state.tokens for r in runs])
    matrix = transition_matrix(MODEL, cfg, temperature)
    exact_k = step_distribution(MODEL.lm_distribution(MAX_NEW, temperature), matrix, k)
    assert total_variation(final, exact_k) < tv_bound(exact_k, n)
    # and the exact k-step law is on its way to the target
    target = MODEL.target(beta, MAX_NEW, method.value, temperature)
    start = MODEL.lm_distribution(MAX_NEW, temperature)
    assert total_variation(exact_k, target) < total_variation(start, target)


def test_http_ancestral_samples_match_the_lm(toy_urls):
    n = 2000
    cfg = KernelConfig(beta=1.0, max_new_tokens=MAX_NEW)

    async def go():
        gen, _ = await _clients(toy_urls)
        prompt = tuple(await gen.chat_prompt(MESSAGES))
        spec = ChainSpec("anc", 5, prompt, MESSAGES, cfg)
        try:
            return await asyncio.gather(
                *(initial_step(ancestral_spec(spec, j), gen, None) for j in range(n))
            )
        finally:
            await close_sessions()

    records = asyncio.run(go())
    lm = MODEL.lm_distribution(MAX_NEW)
    assert total_variation(empirical([r.state.tokens for r in records]), lm) < tv_bound(lm, n)


@pytest.mark.parametrize(
    ("alpha", "index"),
    [(0.5, "uniform"), (2.0, "uniform"), (2.0, "last_block:2")],
)
def test_http_power_chains_match_the_exact_k_step_law(toy_urls, alpha, index):
    """Power sampling reads the server's per-token logprobs of both suffixes; no reward server."""
    n, k = 800, 6
    cfg = kernel_config("power", beta=None, alpha=alpha, max_new_tokens=MAX_NEW, index=index)

    async def go():
        gen, _ = await _clients(toy_urls)
        prompt = tuple(await gen.chat_prompt(MESSAGES))
        specs = [ChainSpec(f"p{i}", 7, prompt, MESSAGES, cfg) for i in range(n)]
        try:
            return await run_chains(specs, k, gen, None, concurrency=128)
        finally:
            await close_sessions()

    runs = asyncio.run(go())
    assert all(len(r) == k + 1 for r in runs)
    assert all(r.state.logprobs is not None for records in runs for r in records)
    final = empirical([r[-1].state.tokens for r in runs])
    start = MODEL.lm_distribution(MAX_NEW)
    exact_k = step_distribution(start, transition_matrix(MODEL, cfg), k)
    assert total_variation(final, exact_k) < tv_bound(exact_k, n)
    target = MODEL.target(1.0, MAX_NEW, "power", alpha=alpha)
    assert total_variation(exact_k, target) < total_variation(start, target)
