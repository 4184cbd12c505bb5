"""vLLM / SGLang / llama.cpp clients against scripted fake servers over real HTTP."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from qalign.clients import (
    AutoReward,
    ContextLengthError,
    HttpSettings,
    LlamaCppGenerator,
    ModelNotServedError,
    ProtocolError,
    SamplingParams,
    SGLangGenerator,
    SGLangReward,
    TemplateUnavailableError,
    VLLMGenerator,
    VLLMReward,
    close_sessions,
    make_generator,
    make_reward,
    render_plain,
)
from qalign.clients.llamacpp import llamacpp_seed
from qalign.clients.vllm import parse_token_id_strings
from qalign.core.state import Finish

FAST = HttpSettings(
    connect_timeout=1.0,
    read_timeout=2.0,
    max_retries=3,
    backoff_initial=0.01,
    backoff_max=0.02,
    cooldown=0.3,
    health_poll_interval=0.02,
)
EOS = 2
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(autouse=True)
async def _sessions() -> AsyncIterator[None]:
    yield
    await close_sessions()


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def text_ids(text: str) -> list[int]:
    return [100 + (ord(c) % 50) for c in text]


class Fake:
    """Shared bookkeeping: requests seen per path, optional scripted failures."""

    def __init__(self) -> None:
        self.seen: dict[str, list[Any]] = {}
        self.fail: dict[str, list[tuple[int, Any]]] = {}

    def app(self, routes: dict[str, Callable[[Any], Any]]) -> web.Application:
        app = web.Application()
        for key, fn in routes.items():
            method, path = key.split(" ", 1)
            app.router.add_route(method, path, self._handler(path, fn))
        return app

    def _handler(self, path: str, fn: Callable[[Any], Any]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.json() if request.method == "POST" else None
            self.seen.setdefault(path, []).append(body)
            if self.fail.get(path):
                status, payload = self.fail[path].pop(0)
                return web.json_response(payload, status=status)
            result = fn(body)
            if isinstance(result, web.StreamResponse):
                return result
            return web.json_response(result)

        return handler


# --------------------------------------------------------------------------------------------
# fake vLLM
# --------------------------------------------------------------------------------------------


class FakeVLLM(Fake):
    def __init__(
        self,
        *,
        name: str = "smollm2",
        max_model_len: int = 2048,
        token_ids: bool = True,
        openapi: bool = True,
        honors_activation: bool = True,
        new_tokens: int = 3,
        finish_reason: str | None = None,
        chat_classify: bool = True,
        chat_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.chat_classify = chat_classify  # /classify accepts `messages` (vLLM >= ~0.13)
        self.chat_offset = chat_offset  # added to chat-form scores: a server whose forms disagree
        self.max_model_len = max_model_len
        self.token_ids = token_ids
        self.openapi = openapi
        self.honors_activation = honors_activation
        self.new_tokens = new_tokens
        self.finish_reason = finish_reason

    def build(self) -> web.Application:
        return self.app(
            {
                "GET /health": lambda _: web.Response(status=200),
                "GET /v1/models": self.models,
                "GET /openapi.json": self.schema,
                "POST /tokenize": self.tokenize,
                "POST /detokenize": lambda b: {"prompt": " ".join(map(str, b["tokens"]))},
                "POST /v1/completions": self.completions,
                "POST /classify": lambda b: self.scores(b, "probs"),
                "POST /pooling": lambda b: self.scores(b, "data"),
            }
        )

    def models(self, _: Any) -> Any:
        entry = {"id": self.name, "object": "model", "root": f"/models/{self.name}-dir"}
        entry["max_model_len"] = self.max_model_len
        return {"object": "list", "data": [entry]}

    def schema(self, _: Any) -> Any:
        if not self.openapi:
            return web.json_response({"detail": "Not Found"}, status=404)
        props = {"prompt": {}, "max_tokens": {}, "seed": {}}
        if self.token_ids:
            props["return_token_ids"] = {}
        return {"components": {"schemas": {"CompletionRequest": {"properties": props}}}}

    def tokenize(self, body: Any) -> Any:
        if "messages" in body:
            ids = [1]
            for m in body["messages"]:
                ids += [5, *text_ids(m["content"]), 6]
            if body.get("add_generation_prompt", True):
                ids += [5, 7]
        else:
            ids = ([1] if body.get("add_special_tokens", True) else []) + text_ids(body["prompt"])
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def completions(self, body: Any) -> Any:
        n = min(body["max_tokens"], self.new_tokens)
        ids = [200 + (body["seed"] % 10) + i for i in range(n)]
        finish = "length"
        stop_reason = None
        if body["max_tokens"] > self.new_tokens:
            ids.append(EOS)
            finish = "stop"
        choice: dict[str, Any] = {
            "index": 0,
            "text": "x" * len(ids),
            "finish_reason": self.finish_reason or finish,
            "stop_reason": stop_reason,
            "prompt_logprobs": None,
            "logprobs": None,
        }
        if self.token_ids and body.get("return_token_ids"):
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = body["prompt"]
        if body.get("logprobs") is not None:
            as_ids = body.get("return_tokens_as_token_ids")
            choice["logprobs"] = {
                "tokens": [f"token_id:{t}" if as_ids else "tok" for t in ids],
                "token_logprobs": [-0.5 - 0.1 * i for i in range(len(ids))],
                "top_logprobs": None,
                "text_offset": list(range(len(ids))),
            }
        return {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}

    def raw_reward(self, ids: list[int]) -> float:
        return (sum(ids) % 17) - 8.0

    def scores(self, body: Any, field: str) -> Any:
        offset = 0.0
        if "messages" in body:
            if not self.chat_classify:
                return web.json_response(
                    {"error": {"message": "input: Field required"}}, status=400
                )
            tok = {"messages": body["messages"], "add_generation_prompt": False}
            inputs = [self.tokenize(tok)["tokens"]]
            offset = self.chat_offset
        else:
            inputs = body["input"]
        if inputs and isinstance(inputs[0], str):
            inputs = [text_ids(t) for t in inputs]
        activate = body.get("use_activation") is not False or not self.honors_activation
        data = []
        for i, ids in enumerate(inputs):
            r = self.raw_reward(ids) + offset
            v = sigmoid(r) if activate else r
            data.append({"index": i, field: [v]})
        data.reverse()  # order must come from `index`, not position
        n = sum(len(ids) for ids in inputs)
        return {"id": "x", "object": "list", "data": data, "usage": {"prompt_tokens": n}}


async def test_vllm_generator_start_chat_generate() -> None:
    fake = FakeVLLM()
    async with serve(fake.build()) as url:
        gen = VLLMGenerator(url + "/", "smollm2", settings=FAST)
        await gen.start()
        assert gen.max_model_len == 2048 and gen.token_ids_mode == "token_ids"
        assert "/v1/completions" not in fake.seen  # decided from /openapi.json
        prompt = await gen.chat_prompt([{"role": "user", "content": "hi"}])
        assert prompt[0] == 1 and prompt[-2:] == [5, 7]
        tok = fake.seen["/tokenize"][-1]
        assert tok["messages"] == [{"role": "user", "content": "hi"}]
        assert tok["add_generation_prompt"] is True and tok["add_special_tokens"] is False

        params = SamplingParams(temperature=0.7, stop_token_ids=(EOS, 9))
        out = await gen.generate(prompt, max_tokens=16, seed=12345, params=params, affinity="c1")
        assert out.token_ids == (205, 206, 207, EOS) and out.finish is Finish.STOP
        assert out.endpoint == url and out.latency_s > 0 and out.logprobs is None
        body = fake.seen["/v1/completions"][-1]
        expected = {
            "model": "smollm2",
            "prompt": prompt,
            "max_tokens": 16,
            "n": 1,
            "temperature": 0.7,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": 12345,
            "stop_token_ids": [EOS, 9],
            "return_token_ids": True,
            "ignore_eos": False,
            "min_tokens": 0,
        }
        assert {k: body[k] for k in expected} == expected
        assert "logprobs" not in body

        out = await gen.generate(prompt, max_tokens=2, seed=1, params=params, logprobs=True)
        assert out.token_ids == (201, 202) and out.finish is Finish.LENGTH
        assert out.logprobs == pytest.approx((-0.5, -0.6))
        assert fake.seen["/v1/completions"][-1]["logprobs"] == 0
        assert await gen.detokenize([1, 2]) == "1 2"
        await gen.close()


async def test_vllm_old_server_token_id_fallback() -> None:
    fake = FakeVLLM(token_ids=False, openapi=False)
    async with serve(fake.build()) as url:
        gen = VLLMGenerator(url, "smollm2", settings=FAST)
        await gen.start()
        assert gen.token_ids_mode == "logprobs"  # decided by a one-token probe
        out = await gen.generate([1, 2, 3], max_tokens=8, seed=3, params=SamplingParams())
        assert out.token_ids == (203, 204, 205, EOS) and out.finish is Finish.STOP
        body = fake.seen["/v1/completions"][-1]
        assert body["logprobs"] == 0 and body["return_tokens_as_token_ids"] is True
        assert "return_token_ids" not in body


async def test_vllm_auto_mode_without_start_falls_back() -> None:
    fake = FakeVLLM(token_ids=False, openapi=False)
    async with serve(fake.build()) as url:
        gen = VLLMGenerator(url, "smollm2", settings=FAST)  # no start(): mode "auto"
        out = await gen.generate([1], max_tokens=8, seed=0, params=SamplingParams())
        assert out.token_ids[-1] == EOS and gen.token_ids_mode == "logprobs"


def test_parse_token_id_strings() -> None:
    assert parse_token_id_strings(["token_id:28", "token_id:0"]) == [28, 0]
    with pytest.raises(ProtocolError, match="token_id:N"):
        parse_token_id_strings([" hello"])


async def test_vllm_model_not_served_lists_names() -> None:
    fake = FakeVLLM(name="smollm2")
    async with serve(fake.build()) as url:
        gen = VLLMGenerator(url, "llama-3", settings=FAST)
        with pytest.raises(ModelNotServedError) as info:
            await gen.start()
        text = str(info.value)
        assert "'llama-3'" in text and "'smollm2'" in text and url in text


async def test_vllm_context_length_checked_client_side() -> None:
    fake = FakeVLLM(max_model_len=64)
    async with serve(fake.build()) as url:
        gen = VLLMGenerator(url, "smollm2", settings=FAST)
        await gen.start()
        with pytest.raises(ContextLengthError, match="exceeds the context window of 64"):
            await gen.generate([1] * 60, max_tokens=5, seed=0, params=SamplingParams())
        assert "/v1/completions" not in fake.seen
        with pytest.raises(ValueError):
            await gen.generate([1], max_tokens=0, seed=0, params=SamplingParams())


async def test_vllm_abort_is_protocol_error_retried() -> None:
    fake = FakeVLLM(finish_reason="abort")
    async with serve(fake.build()) as url:
        gen = VLLMGenerator(url, "smollm2", settings=FAST, token_ids_mode="token_ids")
        with pytest.raises(ProtocolError, match="abort"):
            await gen.generate([1], max_tokens=8, seed=0, params=SamplingParams())
        assert len(fake.seen["/v1/completions"]) == 1 + FAST.malformed_retries


async def test_vllm_generator_retries_and_fails_over() -> None:
    fake_a, fake_b = FakeVLLM(), FakeVLLM()
    async with serve(fake_a.build()) as url_a, serve(fake_b.build()) as url_b:
        gen = VLLMGenerator([url_a, url_b], "smollm2", settings=FAST, token_ids_mode="token_ids")
        key = next(f"k{i}" for i in range(100) if gen.pool.choose(f"k{i}").url == url_a)
        fake_a.fail["/v1/completions"] = [(503, {"error": {"message": "down"}})]
        out = await gen.generate([1], max_tokens=8, seed=0, params=SamplingParams(), affinity=key)
        assert out.endpoint == url_b and gen.pool.failovers == 1
        # same seed re-sent to the other replica
        assert (
            fake_a.seen["/v1/completions"][0]["seed"] == fake_b.seen["/v1/completions"][0]["seed"]
        )


async def test_vllm_reward_raw_batched_and_ordered() -> None:
    fake = FakeVLLM(name="rm")
    convs = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * i}]
        for i in range(5)
    ]
    async with serve(fake.build()) as url:
        rm = VLLMReward(url, "rm", settings=FAST, batch_size=2)
        await rm.start()
        assert rm.activation == "raw"
        probe_calls = len(fake.seen["/classify"])
        scores = await rm.score(convs)
        classify = fake.seen["/classify"][probe_calls:]
        assert len(classify) == 3  # one request per batch of <= 2
        assert all(c["use_activation"] is False for c in classify)
        assert sorted(len(c["input"]) for c in classify) == [1, 2, 2]
        tok = [b for b in fake.seen["/tokenize"] if "messages" in b][-5:]
        assert all(b["add_generation_prompt"] is False for b in tok)
        expected = [
            fake.raw_reward(fake.tokenize({**b, "add_generation_prompt": False})["tokens"])
            for b in [{"messages": c} for c in convs]
        ]
        assert scores == pytest.approx(expected)
        assert await rm.score([]) == []


async def test_vllm_reward_detects_ignored_use_activation() -> None:
    fake = FakeVLLM(name="rm", honors_activation=False)
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hey"}]
    async with serve(fake.build()) as url:
        rm = VLLMReward(url, "rm", settings=FAST)
        await rm.start()
        assert rm.activation == "sigmoid"
        ids = fake.tokenize({"messages": conv, "add_generation_prompt": False})["tokens"]
        (score,) = await rm.score([conv])
        assert score == pytest.approx(fake.raw_reward(ids), abs=1e-6)


async def test_vllm_reward_scores_a_conversation_with_one_chat_form_request() -> None:
    fake = FakeVLLM(name="rm")
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}]
    async with serve(fake.build()) as url:
        rm = VLLMReward(url, "rm", settings=FAST)
        await rm.start()
        assert rm.input_form == "messages" and rm.activation == "raw"
        seen = {k: len(v) for k, v in fake.seen.items()}
        (score,), (tokens,) = await rm.score_with_tokens([conv])
        ids = fake.tokenize({"messages": conv, "add_generation_prompt": False})["tokens"]
        assert score == pytest.approx(fake.raw_reward(ids)) and tokens == len(ids)
        assert len(fake.seen["/tokenize"]) == seen["/tokenize"]  # no templating request
        assert len(fake.seen["/classify"]) == seen["/classify"] + 1
        assert fake.seen["/classify"][-1] == {
            "model": "rm",
            "messages": conv,
            "add_generation_prompt": False,
            "add_special_tokens": False,
            "use_activation": False,
        }


@pytest.mark.parametrize("fake_kw", [{"chat_classify": False}, {"chat_offset": 0.5}])
async def test_vllm_reward_uses_token_ids_where_the_chat_form_fails_or_differs(
    fake_kw: dict[str, Any],
) -> None:
    fake = FakeVLLM(name="rm", **fake_kw)
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}]
    async with serve(fake.build()) as url:
        rm = VLLMReward(url, "rm", settings=FAST)
        await rm.start()
        assert rm.input_form == "ids" and rm.activation == "raw"
        (score,) = await rm.score([conv])
        ids = fake.tokenize({"messages": conv, "add_generation_prompt": False})["tokens"]
        assert score == pytest.approx(fake.raw_reward(ids))
        assert fake.seen["/classify"][-1]["input"] == [ids]


def test_logit_clamps() -> None:
    from qalign.clients.http import logit

    assert math.isfinite(logit(1.0)) and logit(1.0) > 20
    assert math.isfinite(logit(0.0)) and logit(0.0) < -20
    assert logit(0.5) == pytest.approx(0.0)
    assert math.isnan(logit(float("nan")))


async def test_vllm_reward_pooling_endpoint() -> None:
    fake = FakeVLLM(name="rm")
    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    async with serve(fake.build()) as url:
        rm = make_reward("vllm-pooling", url, "rm", settings=FAST, activation="raw")
        await rm.start()
        (score,) = await rm.score([conv])
        ids = fake.tokenize({"messages": conv, "add_generation_prompt": False})["tokens"]
        assert score == pytest.approx(fake.raw_reward(ids))
        assert "/pooling" in fake.seen and "/classify" not in fake.seen


# --------------------------------------------------------------------------------------------
# fake SGLang
# --------------------------------------------------------------------------------------------


class FakeSGLang(Fake):
    def __init__(
        self,
        *,
        include_eos: bool = False,
        prefix_prompt: int = 0,
        reject_seed: bool = False,
        is_generation: bool = True,
    ) -> None:
        super().__init__()
        self.include_eos = include_eos
        self.prefix_prompt = prefix_prompt
        self.reject_seed = reject_seed
        self.is_generation = is_generation

    def build(self) -> web.Application:
        return self.app(
            {
                "GET /health": lambda _: web.Response(status=200),
                "GET /get_model_info": lambda _: {
                    "model_path": "/models/qwen",
                    "is_generation": self.is_generation,
                },
                "GET /v1/models": lambda _: {
                    "object": "list",
                    "data": [{"id": "qwen", "max_model_len": 4096}],
                },
                "POST /tokenize": self.tokenize,
                "POST /detokenize": lambda b: {"text": "|".join(map(str, b["tokens"]))},
                "POST /generate": self.generate,
                "POST /classify": self.classify,
            }
        )

    def tokenize(self, body: Any) -> Any:
        if "prompt" not in body:
            return web.json_response({"detail": [{"msg": "prompt: field required"}]}, status=422)
        ids = ([1] if body.get("add_special_tokens", True) else []) + text_ids(body["prompt"])
        return {"tokens": ids, "count": len(ids), "max_model_len": 4096}

    def generate(self, body: Any) -> Any:
        sp = body["sampling_params"]
        if self.reject_seed and "sampling_seed" in sp:
            return web.json_response({"error": {"message": "unexpected sampling_seed"}}, status=400)
        n = sp["max_new_tokens"]
        seed = sp.get("sampling_seed", 0)
        sampled = [300 + seed % 10 + i for i in range(min(n, 3))]
        if n > 3:
            sampled.append(EOS)
            reason: dict[str, Any] = {"type": "stop", "matched": EOS}
        else:
            reason = {"type": "length", "length": n}
        out = list(sampled)
        if reason["type"] == "stop" and not self.include_eos:
            out = out[:-1]
        out = body["input_ids"][-self.prefix_prompt :] + out if self.prefix_prompt else out
        meta: dict[str, Any] = {
            "id": "r1",
            "finish_reason": reason,
            "prompt_tokens": len(body["input_ids"]),
            "completion_tokens": len(sampled),
            "cached_tokens": 0,
        }
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [
                [-1.0 - 0.1 * i, t, None] for i, t in enumerate(sampled)
            ]
        return {"text": "…", "output_ids": out, "meta_info": meta}

    def classify(self, body: Any) -> Any:
        if "input_ids" in body:
            items = body["input_ids"]
            values = [float(sum(ids) % 13) - 6 for ids in items]
        else:
            values = [float(len(t)) for t in body["text"]]
        results = [{"embedding": [v], "meta_info": {}} for v in values]
        return results[0] if len(results) == 1 else results


@pytest.mark.parametrize(("include_eos", "prefix"), [(False, 0), (True, 0), (False, 2), (True, 3)])
async def test_sglang_generate_mapping_and_eos(include_eos: bool, prefix: int) -> None:
    fake = FakeSGLang(include_eos=include_eos, prefix_prompt=prefix)
    async with serve(fake.build()) as url:
        gen = SGLangGenerator(url, "qwen", settings=FAST)
        await gen.start()
        assert gen.max_model_len == 4096 and gen.seed_field == "sampling_seed"
        params = SamplingParams(temperature=0.5, stop_token_ids=(EOS,))
        out = await gen.generate([1, 9, 9], max_tokens=10, seed=7, params=params, logprobs=True)
        assert out.token_ids == (307, 308, 309, EOS) and out.finish is Finish.STOP
        assert out.logprobs == pytest.approx((-1.0, -1.1, -1.2, -1.3))
        body = fake.seen["/generate"][-1]
        assert body["input_ids"] == [1, 9, 9] and body["return_logprob"] is True
        assert body["sampling_params"] == {
            "max_new_tokens": 10,
            "min_new_tokens": 0,
            "temperature": 0.5,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "ignore_eos": False,
            "skip_special_tokens": False,
            "no_stop_trim": True,
            "n": 1,
            "stop_token_ids": [EOS],
            "sampling_seed": 7,
        }
        out = await gen.generate([1], max_tokens=2, seed=1, params=SamplingParams())
        assert out.token_ids == (301, 302) and out.finish is Finish.LENGTH and out.logprobs is None
        assert await gen.detokenize([4, 5]) == "4|5"
        detok = fake.seen["/detokenize"][-1]
        assert detok["skip_special_tokens"] is False


async def test_sglang_seed_field_rejected_is_dropped() -> None:
    fake = FakeSGLang(reject_seed=True)
    async with serve(fake.build()) as url:
        gen = SGLangGenerator(url, "qwen", settings=FAST)
        await gen.start()
        assert gen.seed_field is None
        out = await gen.generate([1], max_tokens=8, seed=3, params=SamplingParams())
        assert out.finish is Finish.STOP and "sampling_seed" not in fake.seen["/generate"][-1]


async def test_sglang_chat_prompt_templating_options() -> None:
    sg, vl = FakeSGLang(), FakeVLLM(name="qwen")
    msgs = [{"role": "user", "content": "hi"}]
    async with serve(sg.build()) as url, serve(vl.build()) as template_url:
        plain = SGLangGenerator(url, "qwen", settings=FAST)
        with pytest.raises(TemplateUnavailableError, match="template_url"):
            await plain.chat_prompt(msgs)

        via_vllm = SGLangGenerator(url, "qwen", settings=FAST, template_url=template_url)
        ids = await via_vllm.chat_prompt(msgs)
        assert ids == vl.tokenize({"messages": msgs, "add_generation_prompt": True})["tokens"]
        assert vl.seen["/tokenize"][-1]["add_generation_prompt"] is True

        rendered = SGLangGenerator(
            url, "qwen", settings=FAST, chat_template=lambda m: f"<u>{m[0]['content']}</u><a>"
        )
        ids = await rendered.chat_prompt(msgs)
        assert ids == text_ids("<u>hi</u><a>")  # no BOS added: add_special_tokens false
        assert sg.seen["/tokenize"][-1]["add_special_tokens"] is False


async def test_sglang_reward_input_ids_and_text() -> None:
    sg, vl = FakeSGLang(is_generation=False), FakeVLLM(name="qwen")
    convs = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * i}]
        for i in range(3)
    ]
    async with serve(sg.build()) as url, serve(vl.build()) as template_url:
        rm = SGLangReward(url, "qwen", settings=FAST, template_url=template_url, batch_size=2)
        await rm.start()
        scores = await rm.score(convs)
        sent = sg.seen["/classify"]
        assert [len(b["input_ids"]) for b in sent] == [2, 1]  # a single object came back for 1
        ids = [
            vl.tokenize({"messages": c, "add_generation_prompt": False})["tokens"] for c in convs
        ]
        assert scores == [float(sum(x) % 13) - 6 for x in ids]

        text_rm = make_reward("sglang", url, "qwen", settings=FAST)
        await text_rm.start()
        assert await text_rm.score(convs[:2]) == [float(len(render_plain(c))) for c in convs[:2]]
        assert sg.seen["/classify"][-1]["text"][0] == "User: q\n\nAssistant: "


async def test_auto_reward_detection() -> None:
    vl, sg = FakeVLLM(name="rm"), FakeSGLang(is_generation=False)
    async with serve(vl.build()) as v_url, serve(sg.build()) as s_url:
        auto = make_reward("auto", v_url, "rm", settings=FAST)
        assert isinstance(auto, AutoReward)
        await auto.start()
        assert auto.backend == "vllm" and isinstance(auto.inner, VLLMReward)
        assert len(await auto.score([[{"role": "user", "content": "x"}]])) == 1
        # vLLM-only keyword arguments are dropped (with a warning) for a detected SGLang server
        auto2 = make_reward("auto", s_url, "qwen", settings=FAST, activation="raw", batch_size=4)
        await auto2.start()
        assert isinstance(auto2, AutoReward) and auto2.backend == "sglang"
        assert isinstance(auto2.inner, SGLangReward) and auto2.inner.batch_size == 4
        await auto.close()
        await auto2.close()


# --------------------------------------------------------------------------------------------
# fake llama.cpp
# --------------------------------------------------------------------------------------------


class FakeLlama(Fake):
    def __init__(
        self,
        *,
        bos: bool = True,
        template_has_bos: bool = True,
        include_eos: bool = False,
        loading_polls: int = 2,
        overshoot: int = 0,
    ) -> None:
        super().__init__()
        self.bos = bos
        self.template_has_bos = template_has_bos
        self.include_eos = include_eos
        self.loading = loading_polls
        self.overshoot = overshoot

    def build(self) -> web.Application:
        return self.app(
            {
                "GET /health": self.health,
                "GET /props": lambda _: {
                    "default_generation_settings": {"n_ctx": 4096, "params": {}},
                    "total_slots": 4,
                    "model_path": "/m/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "bos_token": "<s>",
                    "eos_token": "<|im_end|>",
                },
                "GET /v1/models": lambda _: {"object": "list", "data": [{"id": "smollm2"}]},
                "POST /tokenize": self.tokenize,
                "POST /detokenize": lambda b: {"content": "".join(f"<{t}>" for t in b["tokens"])},
                "POST /apply-template": self.apply_template,
                "POST /completion": self.completion,
            }
        )

    def health(self, _: Any) -> Any:
        if self.loading > 0:
            self.loading -= 1
            return web.json_response(
                {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                status=503,
            )
        return {"status": "ok"}

    def tokenize(self, body: Any) -> Any:
        text: str = body["content"]
        ids: list[int] = []
        if body.get("add_special") and self.bos:
            ids.append(1)
        for special, tok in (("<s>", 1), ("<|im_end|>", EOS)):
            if text.startswith(special) and body.get("parse_special", True):
                ids.append(tok)
                text = text[len(special) :]
        return {"tokens": ids + text_ids(text)}

    def apply_template(self, body: Any) -> Any:
        inner = "".join(f"[{m['role']}]{m['content']}" for m in body["messages"]) + "[assistant]"
        return {"prompt": ("<s>" if self.template_has_bos else "") + inner}

    def completion(self, body: Any) -> Any:
        n = body["n_predict"]
        sampled = [400 + body["seed"] % 10 + i for i in range(min(n, 3) + self.overshoot)]
        stop_type = "limit"
        if n > 3:
            sampled.append(EOS)
            stop_type = "eos"
        tokens = sampled if (self.include_eos or stop_type != "eos") else sampled[:-1]
        resp: dict[str, Any] = {
            "content": "…",
            "tokens": tokens,
            "stop_type": stop_type,
            "stopping_word": "",
            "tokens_predicted": len(sampled),
            "tokens_evaluated": len(body["prompt"]),
            "truncated": False,
        }
        if body.get("n_probs", 0) > 0:
            resp["completion_probabilities"] = [
                {"id": t, "token": "x", "logprob": -0.25 * (i + 1), "top_logprobs": []}
                for i, t in enumerate(sampled)
            ]
        return resp


@pytest.mark.parametrize("include_eos", [False, True])
async def test_llamacpp_generate_mapping_and_eos(include_eos: bool) -> None:
    fake = FakeLlama(include_eos=include_eos)
    async with serve(fake.build()) as url:
        gen = LlamaCppGenerator(url, "smollm2", settings=FAST)
        await gen.start()  # waits out two 503 "Loading model"
        assert gen.max_model_len == 4096 and gen.eos_token_id == EOS and gen.bos_ids == [1]
        seed = 2**40 + 5
        out = await gen.generate(
            [1, 50, 51], max_tokens=10, seed=seed, params=SamplingParams(0.8), logprobs=True
        )
        s = llamacpp_seed(seed) % 10
        assert out.token_ids == (400 + s, 401 + s, 402 + s, EOS) and out.finish is Finish.STOP
        assert out.logprobs == pytest.approx((-0.25, -0.5, -0.75, -1.0))
        body = fake.seen["/completion"][-1]
        expected = {
            "prompt": [1, 50, 51],
            "n_predict": 10,
            "temperature": 0.8,
            "top_k": 0,
            "top_p": 1.0,
            "min_p": 0.0,
            "typical_p": 1.0,
            "repeat_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": llamacpp_seed(seed),
            "return_tokens": True,
            "cache_prompt": True,
            "n_probs": 1,
        }
        assert {k: body[k] for k in expected} == expected
        assert "id_slot" not in body and 0 <= body["seed"] < 0xFFFFFFFF

        out = await gen.generate([1], max_tokens=2, seed=0, params=SamplingParams())
        assert out.finish is Finish.LENGTH and len(out.token_ids) == 2 and out.logprobs is None
        assert fake.seen["/completion"][-1]["n_probs"] == 0
        assert await gen.detokenize([7, 8]) == "<7><8>"


async def test_llamacpp_overshoot_truncated_to_budget() -> None:
    fake = FakeLlama(loading_polls=0, overshoot=1)
    async with serve(fake.build()) as url:
        gen = LlamaCppGenerator(url, "smollm2", settings=FAST)
        await gen.start()
        out = await gen.generate([1], max_tokens=2, seed=0, params=SamplingParams())
        assert len(out.token_ids) == 2 and out.finish is Finish.LENGTH


@pytest.mark.parametrize(
    ("bos", "template_has_bos", "expect_bos"),
    [(True, True, True), (True, False, True), (False, False, False)],
)
async def test_llamacpp_chat_prompt_single_bos(
    bos: bool, template_has_bos: bool, expect_bos: bool
) -> None:
    fake = FakeLlama(bos=bos, template_has_bos=template_has_bos, loading_polls=0)
    msgs = [{"role": "user", "content": "hi"}]
    async with serve(fake.build()) as url:
        gen = LlamaCppGenerator(url, "smollm2", settings=FAST)
        await gen.start()
        ids = await gen.chat_prompt(msgs)
        body = text_ids("[user]hi[assistant]")
        assert ids == ([1] if expect_bos else []) + body
        tok = fake.seen["/tokenize"][-1]
        assert tok["add_special"] is False and tok["parse_special"] is True
        assert fake.seen["/apply-template"][-1] == {"messages": msgs}


async def test_llamacpp_model_alias_checked() -> None:
    fake = FakeLlama(loading_polls=0)
    async with serve(fake.build()) as url:
        gen = LlamaCppGenerator(url, "other", settings=FAST)
        with pytest.raises(ModelNotServedError, match="'smollm2'"):
            await gen.start()
        ok = LlamaCppGenerator(url, "SmolLM2-135M-Instruct.Q4_1.gguf", settings=FAST)
        await ok.start()  # the model file name is accepted too


def test_llamacpp_parse_variants() -> None:
    gen = LlamaCppGenerator("http://x:1", "m", eos_token_id=EOS)
    # old boolean flags; EOS included; no tokens_predicted
    ids, fin, _ = gen.parse_completion({"tokens": [5, EOS], "stopped_eos": True}, False)
    assert ids == [5, EOS] and fin is Finish.STOP
    # EOS missing and no count: appended because the last id is not EOS
    ids, _, _ = gen.parse_completion({"tokens": [5], "stop_type": "eos"}, False)
    assert ids == [5, EOS]
    # tokens ignored by the server: ids come from completion_probabilities
    ids, _, lps = gen.parse_completion(
        {
            "tokens": [],
            "stop_type": "limit",
            "completion_probabilities": [{"id": 7, "logprob": -1.0}],
        },
        True,
    )
    assert ids == [7] and lps == [-1.0]
    with pytest.raises(ProtocolError):
        gen.parse_completion({"tokens": [5], "stop_type": "none"}, False)
    with pytest.raises(ContextLengthError):
        gen.parse_completion({"tokens": [5], "stop_type": "limit", "truncated": True}, False)


# --------------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------------


def test_factories() -> None:
    g = make_generator("vllm", "http://a:1/", "m", settings=FAST)
    assert isinstance(g, VLLMGenerator) and g.urls == ["http://a:1"]
    g2 = make_generator("llama.cpp", ["http://a:1/", "b:2"], "m")
    assert isinstance(g2, LlamaCppGenerator) and g2.urls == ["http://a:1", "http://b:2"]
    assert isinstance(make_generator("SGLang", "http://a:1", "m"), SGLangGenerator)
    assert isinstance(make_reward("vllm", "http://a:1", "m"), VLLMReward)
    assert isinstance(make_reward("sglang", "http://a:1", "m"), SGLangReward)
    with pytest.raises(ValueError, match="unknown generator backend 'tgi'"):
        make_generator("tgi", "http://a:1", "m")
    with pytest.raises(ValueError, match="vllm-pooling"):
        make_reward("openai", "http://a:1", "m")


# --------------------------------------------------------------------------------------------
# against the toy vLLM/SGLang-compatible server (qalign.toy.server)
# --------------------------------------------------------------------------------------------

try:  # the toy server is another engineer's module: skip (only) these tests without it
    import qalign.toy.model as toy_model
    import qalign.toy.server as toy_server
except ImportError:  # pragma: no cover
    toy_model = toy_server = None  # type: ignore[assignment]

needs_toy = pytest.mark.skipif(toy_server is None, reason="qalign.toy.server is not available")

TOY_MSGS = [{"role": "user", "content": "say something"}]


@contextlib.contextmanager
def toy(**kw: Any) -> Any:
    with toy_server.serve_in_thread(toy_server.ToyServerOptions(port=0, **kw)) as handle:
        yield handle


@needs_toy
async def test_toy_vllm_generator_exact_logprobs_and_seeds() -> None:
    model = toy_model.ToyModel()
    with toy() as srv:
        gen = VLLMGenerator(srv.url, "toy", settings=FAST)
        await gen.start()
        assert gen.token_ids_mode == "token_ids" and gen.max_model_len == 4096
        prompt = await gen.chat_prompt(TOY_MSGS)
        assert prompt == model.chat_ids(TOY_MSGS, add_generation_prompt=True)
        params = SamplingParams(temperature=0.8)
        a = await gen.generate(prompt, max_tokens=6, seed=11, params=params, logprobs=True)
        b = await gen.generate(prompt, max_tokens=6, seed=11, params=params, logprobs=True)
        assert a.token_ids == b.token_ids and 1 <= len(a.token_ids) <= 6
        if a.finish is Finish.STOP:
            assert a.token_ids[-1] == toy_model.EOS
        else:
            assert len(a.token_ids) == 6 and toy_model.EOS not in a.token_ids
        assert a.logprobs is not None
        expected = [
            model.sequence_logprob(a.token_ids[: i + 1], start=i, temperature=0.8)
            for i in range(len(a.token_ids))
        ]
        assert list(a.logprobs) == pytest.approx(expected, abs=1e-9)
        # continuing from a kept prefix sends prompt + prefix verbatim
        cont = await gen.generate(
            prompt + list(a.token_ids[:1]), max_tokens=4, seed=5, params=params
        )
        assert 1 <= len(cont.token_ids) <= 4
        text = await gen.detokenize(list(a.token_ids))
        assert isinstance(text, str)
        await gen.close()


@needs_toy
async def test_toy_legacy_vllm_matches_modern() -> None:
    params = SamplingParams(temperature=1.0)
    with toy() as modern, toy(legacy_token_ids=True) as legacy:
        new = VLLMGenerator(modern.url, "toy", settings=FAST)
        old = VLLMGenerator(legacy.url, "toy", settings=FAST)
        await new.start()
        await old.start()
        assert new.token_ids_mode == "token_ids" and old.token_ids_mode == "logprobs"
        prompt = await new.chat_prompt(TOY_MSGS)
        for seed in range(5):
            x = await new.generate(prompt, max_tokens=5, seed=seed, params=params)
            y = await old.generate(prompt, max_tokens=5, seed=seed, params=params)
            assert (x.token_ids, x.finish) == (y.token_ids, y.finish)


@pytest.mark.parametrize("ignore_activation", [False, True])
@needs_toy
async def test_toy_vllm_reward(ignore_activation: bool) -> None:
    model = toy_model.ToyModel()
    convs = [
        [*TOY_MSGS, {"role": "assistant", "content": text}]
        for text in ("yes", "no no", "maybe so yes", "so")
    ]
    with toy(ignore_use_activation=ignore_activation) as srv:
        rm = VLLMReward(srv.url, "toy", settings=FAST, batch_size=3)
        await rm.start()
        assert rm.activation == ("sigmoid" if ignore_activation else "raw")
        scores = await rm.score(convs)
        expected = [
            model.reward(model.response_of(model.chat_ids(c, add_generation_prompt=False)))
            for c in convs
        ]
        assert scores == pytest.approx(expected, abs=1e-6)


@needs_toy
async def test_toy_sglang_generator_and_reward() -> None:
    model = toy_model.ToyModel()
    with toy() as srv:
        vgen = VLLMGenerator(srv.url, "toy", settings=FAST)
        sgen = SGLangGenerator(srv.url, "toy", settings=FAST, template_url=srv.url)
        await vgen.start()
        await sgen.start()
        prompt = await sgen.chat_prompt(TOY_MSGS)
        assert prompt == await vgen.chat_prompt(TOY_MSGS)
        params = SamplingParams(temperature=1.0)
        for seed in range(4):
            s = await sgen.generate(prompt, max_tokens=5, seed=seed, params=params, logprobs=True)
            v = await vgen.generate(prompt, max_tokens=5, seed=seed, params=params, logprobs=True)
            assert (s.token_ids, s.finish) == (v.token_ids, v.finish)
            assert s.logprobs == pytest.approx(v.logprobs)

        conv = [*TOY_MSGS, {"role": "assistant", "content": "yes yes"}]
        rm = SGLangReward(srv.url, "toy", settings=FAST, template_url=srv.url)
        await rm.start()
        (score,) = await rm.score([conv])
        ids = model.chat_ids(conv, add_generation_prompt=False)
        assert score == pytest.approx(model.reward(model.response_of(ids)))


@needs_toy
async def test_toy_fault_injection_is_absorbed_by_retries() -> None:
    with toy(error_rate=0.3, fault_seed=1) as srv:
        settings = HttpSettings(max_retries=8, backoff_initial=0.005, backoff_max=0.01)
        gen = VLLMGenerator(srv.url, "toy", settings=settings, token_ids_mode="token_ids")
        prompt = await gen.chat_prompt(TOY_MSGS)
        for seed in range(20):
            await gen.generate(prompt, max_tokens=4, seed=seed, params=SamplingParams())
        assert gen.pool.retries > 0 and gen.pool.failures == 0
        assert srv.metrics()["faults"]["error"] == gen.pool.retries
