"""The llama.cpp backend against the REAL llama.cpp server (xllamacpp wheel, SmolLM2)."""

from __future__ import annotations

import pytest

from qalign.clients import LlamaCppGenerator, SamplingParams
from qalign.core import Finish
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.realservers import LLAMACPP_MODEL, llamacpp_server, require_or_skip, run_async

pytestmark = pytest.mark.real_llamacpp
EOS = 2
QUESTION = [{"role": "user", "content": "What is 2+2? Answer briefly."}]


@pytest.fixture(scope="module")
def server():
    require_or_skip("llamacpp")
    with llamacpp_server(port=8081) as url:
        yield url


def test_generate_detokenize_and_exact_prefix_continuation(server):
    async def go():
        gen = LlamaCppGenerator(server, LLAMACPP_MODEL)
        await gen.start()
        prompt = await gen.chat_prompt(QUESTION)
        greedy = SamplingParams(temperature=0.0)
        full = await gen.generate(prompt, max_tokens=24, seed=1, params=greedy)
        cut = len(full.token_ids) // 2
        rest = await gen.generate(
            prompt + list(full.token_ids[:cut]), max_tokens=24 - cut, seed=1, params=greedy
        )
        a = await gen.generate(prompt, max_tokens=12, seed=9, params=SamplingParams())
        b = await gen.generate(prompt, max_tokens=12, seed=9, params=SamplingParams())
        text = await gen.detokenize(full.token_ids)
        lp = await gen.generate(
            prompt, max_tokens=6, seed=2, params=SamplingParams(), logprobs=True
        )
        return prompt, full, cut, rest, a, b, text, lp

    prompt, full, cut, rest, a, b, text, lp = run_async(go())
    assert prompt.count(1) >= 2 and prompt[0] == 1  # <|im_start|> ids from the chat template
    assert full.token_ids[cut:] == rest.token_ids
    assert a.token_ids == b.token_ids
    assert text.strip()
    assert 0 < len(full.token_ids) <= 24
    if full.finish is Finish.STOP:
        assert full.token_ids[-1] == EOS
    assert lp.logprobs is not None and len(lp.logprobs) == len(lp.token_ids)
    assert all(x <= 0.0 for x in lp.logprobs)


def test_qalign_runs_with_the_llamacpp_generator(server):
    from qalign.base import QAlign
    from qalign.model import RemoteVLLM
    from qalign.reward import RemoteReward

    with serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as rm:
        model = RemoteVLLM(
            server, LLAMACPP_MODEL, max_new_tokens=16, max_prompt_length=200, backend="llamacpp"
        )
        reward = RemoteReward(rm.url, "toy-rm", server_format="vllm")
        out = QAlign(model, reward, beta=1.0, seed=3).run([QUESTION], steps=3)
    (path,) = out.state_path
    assert [r["t"] for r in path] == [0, 1, 2, 3]
    assert all(0 < len(r["completion"]) <= 16 for r in path)
    assert out.texts[0]["outputs"][0].strip()
