"""The toy HTTP server: protocol shapes (vLLM + SGLang) and the exactness of what it samples."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from qalign.toy import ToyModel, ToyServerOptions, serve, serve_in_thread
from qalign.toy.cli import toy_server_command
from qalign.toy.model import ASSISTANT, BOS, END, EOS, USER

MODEL = ToyModel()
YES, NO, MAYBE, SO = MODEL.word_ids
PROMPT = MODEL.chat_ids([{"role": "user", "content": "say something"}], add_generation_prompt=True)
MAX_LEN = 64

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, path: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request; returns (status, parsed JSON body or None when the body is empty)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path,
        data=data,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with _OPENER.open(req, timeout=30) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, payload = err.code, err.read()
    return status, json.loads(payload) if payload else None


def ok(url: str, path: str, body: Any = None) -> Any:
    status, out = call(url, path, body)
    assert status == 200, out
    return out


def complete(url: str, **body: Any) -> dict[str, Any]:
    body.setdefault("prompt", PROMPT)
    body.setdefault("return_token_ids", True)
    return ok(url, "/v1/completions", body)


def tv_bound(p: dict[Any, float], n: int) -> float:
    """E[TV(empirical, p)] <= 0.5 sum sqrt(p(1-p)/n); McDiarmid adds sqrt(ln(1000)/2n) (1e-3)."""
    mean = 0.5 * sum(math.sqrt(q * (1 - q) / n) for q in p.values())
    return mean + math.sqrt(math.log(1000) / (2 * n))


def tv(counts: Counter[Any], p: dict[Any, float]) -> float:
    n = sum(counts.values())
    keys = set(counts) | set(p)
    return 0.5 * sum(abs(counts.get(k, 0) / n - p.get(k, 0.0)) for k in keys)


def conv_ids(reply: str) -> list[int]:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]
    return MODEL.chat_ids(msgs, add_generation_prompt=False)


@pytest.fixture(scope="module")
def url() -> Any:
    opts = ToyServerOptions(served_model_names=("toy", "toy-rm"), port=0, max_model_len=MAX_LEN)
    with serve_in_thread(opts) as handle:
        yield handle.url


# ---- plain endpoints -------------------------------------------------------------------------


def test_health_models_version_info(url: str) -> None:
    status, body = call(url, "/health")
    assert status == 200 and body is None
    models = ok(url, "/v1/models")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["toy", "toy-rm"]
    for m in models["data"]:
        assert m["object"] == "model" and m["owned_by"] == "qalign-toy"
        assert m["root"] == m["id"] and m["max_model_len"] == MAX_LEN
    assert ok(url, "/version")["version"] == "0.11.1"
    info = ok(url, "/get_model_info")
    assert info["model_path"] == "toy" and info["is_generation"] is True
    schema = ok(url, "/openapi.json")["components"]["schemas"]
    assert "return_token_ids" in schema["CompletionRequest"]["properties"]
    assert "use_activation" in schema["ClassificationCompletionRequest"]["properties"]


def test_tokenize_and_detokenize(url: str) -> None:
    out = ok(url, "/tokenize", {"prompt": "yes no"})
    assert out == {
        "count": 3,
        "max_model_len": MAX_LEN,
        "tokens": [BOS, YES, NO],
        "token_strs": None,
    }
    out = ok(url, "/tokenize", {"prompt": "yes no", "add_special_tokens": False})
    assert out["tokens"] == [YES, NO]
    msgs = [{"role": "user", "content": "hello"}]
    assert ok(url, "/tokenize", {"messages": msgs})["tokens"] == MODEL.chat_ids(msgs, True)
    out = ok(url, "/tokenize", {"messages": msgs, "add_generation_prompt": False})
    assert out["tokens"] == MODEL.chat_ids(msgs, False)
    # add_special_tokens with a template doubles the BOS, as on vLLM
    out = ok(url, "/tokenize", {"messages": msgs, "add_special_tokens": True})
    assert out["tokens"][:2] == [BOS, BOS]
    partial = [*msgs, {"role": "assistant", "content": "yes"}]
    body = {"messages": partial, "add_generation_prompt": False, "continue_final_message": True}
    assert ok(url, "/tokenize", body)["tokens"] == [BOS, USER, *MODEL.encode("hello"), END, 3, YES]
    status, err = call(url, "/tokenize", {**body, "add_generation_prompt": True})
    assert status == 400 and err["error"]["type"] == "BadRequestError"
    out = ok(url, "/tokenize", {"prompt": "maybe", "return_token_strs": True})
    assert out["token_strs"] == ["<s>", "maybe"]
    # vLLM reads "prompt", SGLang "text"
    detok = ok(url, "/detokenize", {"tokens": [YES, EOS, SO]})
    assert detok == {"prompt": "yes </s> so", "text": "yes </s> so"}
    assert call(url, "/detokenize", {"tokens": [7]})[0] == 400
    assert call(url, "/tokenize", {"model": "nope", "prompt": "x"})[0] == 404


# ---- vLLM completions --------------------------------------------------------------------------


def test_completion_shape_and_batch_order(url: str) -> None:
    p2 = [*PROMPT, YES]
    out = complete(url, prompt=[PROMPT, p2], n=3, max_tokens=4, seed=5, model="toy")
    assert out["object"] == "text_completion" and out["model"] == "toy"
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    choices = out["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    for c in choices:
        assert set(c) >= {"index", "text", "finish_reason", "stop_reason", "logprobs"}
        assert c["prompt_token_ids"] == (PROMPT if c["index"] < 3 else p2)
        assert c["logprobs"] is None and 1 <= len(c["token_ids"]) <= 4
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(PROMPT) + len(p2)
    assert usage["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # without return_token_ids the ids are not sent
    plain = ok(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert plain["choices"][0]["token_ids"] is None
    assert plain["choices"][0]["prompt_token_ids"] is None
    # a text prompt is tokenized with BOS (add_special_tokens defaults to true)
    text = complete(url, prompt="<|user|> hi <|end|> <|assistant|>", max_tokens=1)
    assert text["choices"][0]["prompt_token_ids"] == [BOS, USER, *MODEL.encode("hi"), END, 3]


def test_seed_determinism(url: str) -> None:
    body = {"max_tokens": 8, "seed": 1234, "n": 3, "temperature": 0.9}
    a, b = complete(url, **body), complete(url, **body)
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    # vLLM's rule: child k of n uses seed + k
    child = complete(url, max_tokens=8, seed=1235, temperature=0.9)["choices"][0]["token_ids"]
    assert child == a["choices"][1]["token_ids"]
    # the same seed is applied to every prompt of a batch: identical prompts, identical samples
    twin = complete(url, prompt=[PROMPT, PROMPT], max_tokens=8, seed=99)["choices"]
    assert twin[0]["token_ids"] == twin[1]["token_ids"]
    # no seed: fresh randomness
    x = complete(url, max_tokens=8, n=40)["choices"]
    y = complete(url, max_tokens=8, n=40)["choices"]
    assert [c["token_ids"] for c in x] != [c["token_ids"] for c in y]


def test_eos_included_and_budget(url: str) -> None:
    out = complete(url, max_tokens=3, n=3000, seed=7)
    finishes = Counter()
    for c in out["choices"]:
        ids = c["token_ids"]
        assert 1 <= len(ids) <= 3
        assert EOS not in ids[:-1]
        if c["finish_reason"] == "stop":
            assert ids[-1] == EOS and c["stop_reason"] is None
        else:
            assert c["finish_reason"] == "length" and len(ids) == 3 and ids[-1] != EOS
            assert c["stop_reason"] is None
        assert "</s>" not in c["text"]
        assert c["text"] == MODEL.decode([t for t in ids if t != EOS])
        finishes[c["finish_reason"]] += 1
    assert finishes["stop"] > 0 and finishes["length"] > 0
    # max_tokens defaults to 16, like vLLM; ignore_eos keeps sampling through EOS
    ids = complete(url, ignore_eos=True, seed=3)["choices"][0]["token_ids"]
    assert len(ids) == 16
    out = complete(url, max_tokens=10, n=200, stop_token_ids=[YES], seed=11)
    for c in out["choices"]:
        if YES in c["token_ids"]:
            assert c["token_ids"][-1] == YES and c["token_ids"].count(YES) == 1
            assert c["finish_reason"] == "stop" and c["stop_reason"] == YES
    # greedy: temperature 0 follows the argmax chain yes -> maybe -> so -> EOS
    greedy = complete(url, max_tokens=10, temperature=0, n=3)["choices"]
    assert all(c["token_ids"] == [YES, MAYBE, SO, EOS] for c in greedy)


def test_empirical_distribution_matches_lm(url: str) -> None:
    n_each = 10_000
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in (1, 10**7):
        out = complete(url, max_tokens=3, n=n_each, seed=seed, temperature=1.0)
        counts.update(tuple(c["token_ids"]) for c in out["choices"])
    target = MODEL.lm_distribution(3)
    assert set(counts) <= set(target)
    n = 2 * n_each
    assert tv(counts, target) < tv_bound(target, n)


def test_logprobs_are_those_of_the_sampled_distribution(url: str) -> None:
    temp = 0.7
    out = complete(url, max_tokens=6, n=300, seed=21, temperature=temp, logprobs=2)
    for c in out["choices"]:
        ids, lp = c["token_ids"], c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids)
        assert lp["tokens"] == [MODEL.decode([t]) for t in ids]
        assert math.isclose(
            sum(lp["token_logprobs"]), MODEL.sequence_logprob(ids, 0, temp), abs_tol=1e-9
        )
        for i, (tok, top) in enumerate(zip(ids, lp["top_logprobs"], strict=True)):
            probs = MODEL.next_probs(ids[i - 1] if i else None, temp)
            assert math.isclose(lp["token_logprobs"][i], math.log(probs[tok]), abs_tol=1e-12)
            best = sorted(probs, key=lambda t: -probs[t])[:2]
            assert set(top) == {MODEL.decode([t]) for t in {tok, *best}}
        assert lp["text_offset"][0] == 0
    # return_tokens_as_token_ids: "token_id:N" strings
    out = complete(url, max_tokens=5, seed=4, logprobs=0, return_tokens_as_token_ids=True)
    c = out["choices"][0]
    assert [int(t.split(":")[1]) for t in c["logprobs"]["tokens"]] == c["token_ids"]
    assert all(len(d) == 1 for d in c["logprobs"]["top_logprobs"])


def test_continuation_from_a_prefix_follows_the_bigram(url: str) -> None:
    temp = 0.8
    prefix = [YES, NO]
    n = 8000
    out = complete(url, prompt=[*PROMPT, *prefix], max_tokens=1, n=n, seed=77, temperature=temp)
    counts = Counter(c["token_ids"][0] for c in out["choices"])
    target = MODEL.next_probs(NO, temp)
    assert tv(counts, target) < tv_bound(target, n)
    # logprobs of a continuation are conditional on the kept prefix
    out = complete(
        url, prompt=[*PROMPT, *prefix], max_tokens=5, n=50, seed=3, temperature=temp, logprobs=0
    )
    for c in out["choices"]:
        full = [*prefix, *c["token_ids"]]
        expect = MODEL.sequence_logprob(full, len(prefix), temp)
        assert math.isclose(sum(c["logprobs"]["token_logprobs"]), expect, abs_tol=1e-9)
    # the response so far ends at the last <|assistant|>: a second turn starts afresh
    second = [*PROMPT, YES, END, USER, END, ASSISTANT]
    out = complete(url, prompt=second, max_tokens=1, n=n, seed=78, temperature=temp)
    counts = Counter(c["token_ids"][0] for c in out["choices"])
    assert tv(counts, MODEL.next_probs(None, temp)) < tv_bound(MODEL.next_probs(None, temp), n)


# ---- rewards -------------------------------------------------------------------------------------


def test_classify_raw_and_sigmoid(url: str) -> None:
    good, bad = conv_ids("yes maybe"), conv_ids("no")
    raw = [MODEL.reward(MODEL.response_of(good)), MODEL.reward(MODEL.response_of(bad))]
    assert raw == pytest.approx([1.3, -0.5])
    body = {"model": "toy-rm", "input": [good, bad], "use_activation": False}
    out = ok(url, "/classify", body)
    assert out["object"] == "list" and out["model"] == "toy-rm" and out["id"].startswith("classify")
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert all(d["label"] == "LABEL_0" and d["num_classes"] == 1 for d in out["data"])
    assert [d["probs"][0] for d in out["data"]] == pytest.approx(raw)
    assert out["usage"]["prompt_tokens"] == len(good) + len(bad)
    sig = ok(url, "/classify", {"input": [good, bad]})
    assert [d["probs"][0] for d in sig["data"]] == pytest.approx(
        [1 / (1 + math.exp(-r)) for r in raw]
    )
    # the other input forms: one id list, a string, a list of strings, a conversation
    one = ok(url, "/classify", {"input": good, "use_activation": False})["data"]
    assert len(one) == 1 and one[0]["probs"] == pytest.approx([1.3])
    text = MODEL.decode(good)
    out = ok(url, "/classify", {"input": [text, text], "use_activation": False})["data"]
    assert [d["probs"][0] for d in out] == pytest.approx([1.3, 1.3])
    assert ok(url, "/classify", {"input": text, "use_activation": False})["data"][0]["probs"] == (
        pytest.approx([1.3])
    )
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]
    out = ok(url, "/classify", {"messages": msgs, "use_activation": False})["data"]
    assert out[0]["probs"] == pytest.approx([-0.5])
    pool = ok(url, "/pooling", {"model": "toy-rm", "input": [good, bad]})
    assert pool["object"] == "list"
    assert [(d["index"], d["object"]) for d in pool["data"]] == [(0, "pooling"), (1, "pooling")]
    assert [d["data"][0] for d in pool["data"]] == pytest.approx(raw)
    # SGLang native /classify: raw score in embedding[0]; one object for one input
    single = ok(url, "/classify", {"input_ids": good})
    assert single["embedding"] == pytest.approx([1.3]) and "meta_info" in single
    many = ok(url, "/classify", {"input_ids": [good, bad]})
    assert [m["embedding"][0] for m in many] == pytest.approx(raw)
    assert ok(url, "/classify", {"text": [text]})[0]["embedding"] == pytest.approx([1.3])


# ---- SGLang /generate -------------------------------------------------------------------------


def test_sglang_generate(url: str) -> None:
    params = {"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0}
    body = {"input_ids": PROMPT, "sampling_params": {**params, "sampling_seed": 5}, "rid": "r1"}
    one = ok(url, "/generate", body)
    assert isinstance(one, dict) and one["meta_info"]["id"] == "r1"
    assert ok(url, "/generate", body)["output_ids"] == one["output_ids"]
    alias = {**body, "sampling_params": {**params, "seed": 5}}
    assert ok(url, "/generate", alias)["output_ids"] == one["output_ids"]

    batch = {"input_ids": [PROMPT] * 400, "sampling_params": params, "return_logprob": True}
    outs = ok(url, "/generate", batch)
    assert isinstance(outs, list) and len(outs) == 400
    kinds = Counter()
    for o in outs:
        ids, meta = o["output_ids"], o["meta_info"]
        fr = meta["finish_reason"]
        kinds[fr["type"]] += 1
        if fr["type"] == "stop":
            # real SGLang keeps the matched stop token in output_ids (only the text is trimmed)
            assert fr["matched"] == EOS and ids[-1] == EOS
        else:
            assert fr == {"type": "length", "length": 3} and len(ids) == 3 and EOS not in ids
        assert o["text"] == MODEL.decode([t for t in ids if t != EOS])
        assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == len(ids)
        lps = meta["output_token_logprobs"]
        assert [t for _, t, _ in lps] == ids and all(x is None for _, _, x in lps)
        assert math.isclose(sum(lp for lp, _, _ in lps), MODEL.sequence_logprob(ids), abs_tol=1e-9)
    assert kinds["stop"] > 0 and kinds["length"] > 0

    nn = ok(url, "/generate", {"input_ids": PROMPT, "sampling_params": {**params, "n": 3}})
    assert isinstance(nn, list) and len(nn) == 3
    status, err = call(url, "/generate", {"input_ids": PROMPT, "sampling_params": {"top_p": 0.5}})
    assert status == 400 and set(err) == {"error"} and set(err["error"]) == {"message"}
    status, err = call(
        url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": MAX_LEN}}
    )
    assert status == 400 and "context length" in err["error"]["message"]


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_p": 0.9}, "top_p"),
        ({"top_k": 5}, "top_k"),
        ({"min_p": 0.1}, "min_p"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"stop": ["x"]}, "stop"),
        ({"stream": True}, "stream"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"prompt": [BOS, -1]}, "prompt"),
        ({"prompt": [BOS, 7]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_bad_requests(url: str, extra: dict[str, Any], param: str) -> None:
    status, err = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **extra})
    assert status == 400
    assert err["error"]["type"] == "BadRequestError" and err["error"]["code"] == 400
    assert err["error"]["param"] == param and err["error"]["message"]


def test_errors(url: str) -> None:
    for path, body in [
        ("/v1/completions", {"model": "nope", "prompt": PROMPT}),
        ("/classify", {"model": "nope", "input": [PROMPT]}),
        ("/pooling", {"model": "nope", "input": [PROMPT]}),
    ]:
        status, err = call(url, path, body)
        assert status == 404
        assert err == {
            "error": {
                "message": "The model `nope` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
        }
    long_prompt = [BOS] * (MAX_LEN - 4)
    status, err = call(url, "/v1/completions", {"prompt": long_prompt, "max_tokens": 5})
    assert status == 400 and "maximum context length" in err["error"]["message"]
    assert call(url, "/v1/completions", {"prompt": long_prompt, "max_tokens": 4})[0] == 200
    status, err = call(url, "/v1/completions", {"prompt": [BOS] * MAX_LEN, "max_tokens": 1})
    assert status == 400 and "maximum context length" in err["error"]["message"]
    status, err = call(url, "/v1/completions", raw=b"{not json")
    assert status == 400 and err["error"]["code"] == 400
    status, err = call(url, "/classify", {"input": [[BOS] * (MAX_LEN + 1)]})
    assert status == 400


def test_special_token_stop_strings_are_inert(url: str) -> None:
    """The EOS text as a `stop` string, as client-side tokenizing clients (the paper authors'
    package) send it, is accepted on both protocols and changes nothing; a stop string the toy
    LM could emit, or the EOS text together with ignore_eos, is still refused."""
    for stop in (["</s>"], "</s>", ["</s>", "<|end|>"]):
        with_stop = complete(url, max_tokens=5, n=8, seed=11, stop=stop)
        plain = complete(url, max_tokens=5, n=8, seed=11)
        assert [c["token_ids"] for c in with_stop["choices"]] == [
            c["token_ids"] for c in plain["choices"]
        ]
    # a text prompt (what such clients send) with the stop string
    text = MODEL.decode(PROMPT[1:])  # the server adds BOS itself
    out = ok(url, "/v1/completions", {"prompt": text, "max_tokens": 3, "stop": ["</s>"]})
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    for extra in ({"stop": ["</s>", "yes"]}, {"stop": ["</s>"], "ignore_eos": True}):
        status, err = call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **extra})
        assert status == 400 and err["error"]["param"] == "stop", err
    params = {"max_new_tokens": 2, "stop": ["</s>"]}
    assert ok(url, "/generate", {"input_ids": PROMPT, "sampling_params": params})["output_ids"]
    params = {"max_new_tokens": 2, "stop": ["so"]}
    status, _ = call(url, "/generate", {"input_ids": PROMPT, "sampling_params": params})
    assert status == 400


# ---- switches, faults, latency -----------------------------------------------------------------


def test_legacy_switches() -> None:
    opts = ToyServerOptions(port=0, legacy_token_ids=True, ignore_use_activation=True)
    with serve_in_thread(opts) as h:
        out = complete(h.url, max_tokens=4, seed=1)
        assert out["choices"][0]["token_ids"] is None
        assert out["choices"][0]["prompt_token_ids"] is None
        out = complete(h.url, max_tokens=4, seed=1, logprobs=0, return_tokens_as_token_ids=True)
        tokens = out["choices"][0]["logprobs"]["tokens"]
        assert all(t.startswith("token_id:") for t in tokens)
        ids = [int(t.split(":")[1]) for t in tokens]
        assert ids and (ids[-1] == EOS or len(ids) == 4)
        body = {"input": [conv_ids("yes")], "use_activation": False}
        assert ok(h.url, "/classify", body)["data"][0]["probs"] == pytest.approx(
            [1 / (1 + math.exp(-1.0))]
        )
        assert ok(h.url, "/version")["version"] == "0.10.1"
        schema = ok(h.url, "/openapi.json")["components"]["schemas"]
        assert "return_token_ids" not in schema["CompletionRequest"]["properties"]


def test_raw_logprobs_mode() -> None:
    with serve_in_thread(ToyServerOptions(port=0, logprobs_mode="raw_logprobs")) as h:
        out = complete(h.url, max_tokens=5, n=20, seed=2, temperature=0.5, logprobs=0)
        for c in out["choices"]:
            lp = sum(c["logprobs"]["token_logprobs"])
            assert math.isclose(lp, MODEL.sequence_logprob(c["token_ids"], 0, 1.0), abs_tol=1e-9)


def test_error_injection_rate() -> None:
    opts = ToyServerOptions(port=0, error_rate=0.3, fault_seed=7)
    with serve_in_thread(opts) as h:
        statuses = Counter()
        for _ in range(300):
            status, body = call(h.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
            statuses[status] += 1
            if status == 503:
                assert body["error"]["code"] == 503 and body["error"]["message"]
        assert set(statuses) == {200, 503}
        assert 50 <= statuses[503] <= 130  # Binomial(300, 0.3): mean 90, sd 7.9
        assert all(call(h.url, "/tokenize", {"prompt": "yes"})[0] == 200 for _ in range(20))
        metrics = h.metrics()
        assert metrics["faults"]["error"] == statuses[503]
        assert metrics["requests"]["/v1/completions"] == 300
        assert ok(h.url, "/metrics")["faults"]["error"] == statuses[503]


def test_hang_injection_rate_and_shutdown() -> None:
    opts = ToyServerOptions(port=0, hang_rate=0.25, hang_seconds=0.03, fault_seed=3)
    with serve_in_thread(opts) as h:
        slow = 0
        for _ in range(80):
            before = h.metrics()["faults"]["hang"]
            start = time.perf_counter()
            assert call(h.url, "/classify", {"input": [PROMPT]})[0] == 200
            took = time.perf_counter() - start
            if h.metrics()["faults"]["hang"] > before:  # counted, not guessed from the clock
                slow += 1
                assert took >= 0.03  # a hung request takes at least hang_seconds
        assert 6 <= slow <= 34  # Binomial(80, 0.25): mean 20, sd 3.9
    # a request hanging for an hour must not hold up stop()
    with serve_in_thread(ToyServerOptions(port=0, hang_rate=1.0)) as h:
        data = json.dumps({"input_ids": PROMPT}).encode()
        req = urllib.request.Request(h.url + "/generate", data=data)
        with pytest.raises(TimeoutError):
            _OPENER.open(req, timeout=0.2)
        assert h.metrics()["faults"]["hang"] == 1
        start = time.perf_counter()
    assert time.perf_counter() - start < 3.0


def test_capacity_and_latency() -> None:
    opts = ToyServerOptions(port=0, capacity=2, latency_base=0.1, latency_per_token=0.01)
    with serve_in_thread(opts) as h:
        body = {"prompt": PROMPT, "max_tokens": 1, "ignore_eos": True}
        start = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: call(h.url, "/v1/completions", body), range(6)))
        elapsed = time.perf_counter() - start
        assert all(status == 200 for status, _ in results)
        assert elapsed >= 3 * 0.11 - 0.01  # 6 sequences, 2 at a time, 0.11 s each
        metrics = h.metrics()
        assert metrics["peak_running_sequences"] == 2
        assert metrics["running_sequences"] == 0
        start = time.perf_counter()
        complete(h.url, max_tokens=10, ignore_eos=True)
        assert time.perf_counter() - start >= 0.1 + 10 * 0.01 - 0.01


def _raw(url: str, path: str, body: Any) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with _OPENER.open(req, timeout=30) as resp:
        return resp.status, resp.read()


def test_faults_are_off_by_default_and_switchable_at_runtime() -> None:
    with serve_in_thread(ToyServerOptions(port=0, fault_seed=5)) as h:
        state = ok(h.url, "/admin/faults")
        assert state["faults"] == {
            "error_rate": 0.0,
            "hang_rate": 0.0,
            "hang_seconds": 3600.0,
            "malformed_rate": 0.0,
            "nan_rate": 0.0,
            "echo_auth": False,
            "seeded_errors": 0,
            "seeded_error_every": 1,
        }
        assert state["injected"] == {
            "error": 0, "hang": 0, "malformed": 0, "nan": 0, "seeded_error": 0,
        }  # fmt: skip
        body = {"prompt": PROMPT, "max_tokens": 1}
        assert all(call(h.url, "/v1/completions", body)[0] == 200 for _ in range(20))
        out = ok(h.url, "/admin/faults", {"error_rate": 1.0})
        assert out["faults"]["error_rate"] == 1.0 and out["faults"]["hang_rate"] == 0.0
        assert all(call(h.url, "/v1/completions", body)[0] == 503 for _ in range(10))
        assert call(h.url, "/tokenize", {"prompt": "yes"})[0] == 200  # metadata is never faulted
        ok(h.url, "/admin/faults", {"error_rate": 0.0})
        assert call(h.url, "/v1/completions", body)[0] == 200
        metrics = ok(h.url, "/metrics")
        assert metrics["faults"]["error"] == 10
        assert metrics["requests"]["/admin/faults"] == 3
        ok(h.url, "/admin/faults", {"hang_rate": 1.0, "hang_seconds": 0.05})
        start = time.perf_counter()
        assert call(h.url, "/classify", {"input": [PROMPT]})[0] == 200
        assert time.perf_counter() - start >= 0.05
        assert h.metrics()["faults"]["hang"] == 1


def test_seeded_faults_depend_on_the_request_not_on_the_order() -> None:
    """Unlucky seeds fail their first N requests whatever else was asked in between."""
    with serve_in_thread(ToyServerOptions(port=0)) as h:
        ok(h.url, "/admin/faults", {"seeded_errors": 2, "seeded_error_every": 3})

        def ask(seed: int) -> int:
            body = {"prompt": PROMPT, "max_tokens": 1, "seed": seed}
            return call(h.url, "/v1/completions", body)[0]

        assert [ask(6), ask(7), ask(6), ask(9), ask(6), ask(7)] == [503, 200, 503, 503, 200, 200]
        assert call(h.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 200
        assert h.metrics()["faults"]["seeded_error"] == 3
        ok(h.url, "/admin/faults", {"seeded_errors": 1})  # a change of settings starts afresh
        assert [ask(6), ask(6)] == [503, 200]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seeded_errors": -1}, "seeded_errors must be a whole number >= 0"),
        ({"seeded_error_every": 0}, "seeded_error_every must be a whole number >= 1"),
        ({"error_rate": 1.5}, "error_rate must be in [0, 1]"),
        ({"error_rate": 0.6, "hang_rate": 0.6}, "error_rate + hang_rate must be <= 1"),
        ({"nan_rate": "often"}, "nan_rate must be a number"),
        ({"hang_seconds": -1}, "hang_seconds must be >= 0"),
        ({"typo_rate": 0.1}, "unknown fault setting(s) ['typo_rate']"),
    ],
)
def test_bad_fault_settings_are_refused_and_change_nothing(change: Any, message: str) -> None:
    with serve_in_thread(ToyServerOptions(port=0)) as h:
        status, out = call(h.url, "/admin/faults", change)
        assert status == 400 and message in out["error"]["message"]
        assert ok(h.url, "/admin/faults")["faults"]["error_rate"] == 0.0


def test_malformed_and_nan_reward_answers() -> None:
    with serve_in_thread(ToyServerOptions(port=0, fault_seed=1)) as h:
        body = {"input": [conv_ids("yes")], "use_activation": False}
        ok(h.url, "/admin/faults", {"malformed_rate": 1.0})
        for path in ("/classify", "/v1/completions"):
            payload = body if path == "/classify" else {"prompt": PROMPT, "max_tokens": 2}
            status, raw = _raw(h.url, path, payload)
            assert status == 200 and raw
            with pytest.raises(json.JSONDecodeError):
                json.loads(raw)
        ok(h.url, "/admin/faults", {"malformed_rate": 0.0, "nan_rate": 1.0})
        assert math.isnan(ok(h.url, "/classify", body)["data"][0]["probs"][0])
        assert math.isnan(ok(h.url, "/pooling", body)["data"][0]["data"][0])
        status, out = call(h.url, "/classify", {"input_ids": conv_ids("no")})  # SGLang shape
        assert status == 200 and math.isnan(out["embedding"][0])
        ok(h.url, "/admin/faults", {"nan_rate": 0.0})
        assert ok(h.url, "/classify", body)["data"][0]["probs"] == pytest.approx([1.0])
        faults = {"error": 0, "hang": 0, "malformed": 2, "nan": 3, "seeded_error": 0}
        assert h.metrics()["faults"] == faults
    # a share, not all: Binomial(200, 0.25), mean 50, sd 6.1
    opts = ToyServerOptions(port=0, nan_rate=0.25, fault_seed=2)
    with serve_in_thread(opts) as h:
        nans = sum(
            math.isnan(ok(h.url, "/classify", {"input": [PROMPT]})["data"][0]["probs"][0])
            for _ in range(200)
        )
        assert 25 <= nans <= 75 and h.metrics()["faults"]["nan"] == nans


# ---- lifecycle ---------------------------------------------------------------------------------


def test_fast_start_and_port_rebind() -> None:
    start = time.perf_counter()
    with serve_in_thread(ToyServerOptions(port=0)) as h:
        # "Fast" with room for a loaded 2-core machine (it takes ~10 ms on a quiet one).
        assert time.perf_counter() - start < 2.0
        port = h.port
        assert h.url == f"http://127.0.0.1:{port}"
        ok(h.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    with serve_in_thread(ToyServerOptions(port=port)) as h:  # re-bound right away
        assert h.port == port
        assert call(h.url, "/health")[0] == 200
        assert h.metrics()["requests"]["/health"] == 1
        h.reset_metrics()
        assert h.metrics()["requests"]["/health"] == 0


async def test_serve_inside_a_running_loop() -> None:
    async with serve(ToyServerOptions(port=0)) as server, aiohttp.ClientSession() as session:
        body = {"prompt": PROMPT, "max_tokens": 3, "return_token_ids": True, "seed": 1}
        async with session.post(server.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            out = await resp.json()
        assert out["choices"][0]["token_ids"]
        assert server.metrics()["requests"]["/v1/completions"] == 1


def test_options_and_cli() -> None:
    with pytest.raises(ValueError):
        ToyServerOptions(error_rate=0.7, hang_rate=0.5)
    with pytest.raises(ValueError):
        ToyServerOptions(served_model_names=())
    with pytest.raises(ValueError):
        ToyServerOptions(logprobs_mode="nope")
    assert ToyServerOptions(served_model_names="m").served_model_names == ("m",)
    runner = CliRunner()
    result = runner.invoke(toy_server_command, ["--help"])
    assert result.exit_code == 0
    for flag in ("--served-model-name", "--latency-per-token", "--legacy-token-ids", "--capacity"):
        assert flag in result.output
    assert "--malformed-rate" in result.output and "--nan-rate" in result.output
    with pytest.raises(ValueError, match="nan_rate must be in"):
        ToyServerOptions(nan_rate=2.0)
    result = runner.invoke(toy_server_command, ["--error-rate", "0.8", "--hang-rate", "0.5"])
    assert result.exit_code != 0 and "error_rate + hang_rate" in result.output


def _with_auth(url: str, body: Any, auth: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with _OPENER.open(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_key_is_required_and_echo_auth_quotes_the_header() -> None:
    body = {"prompt": PROMPT, "max_tokens": 1}
    with serve_in_thread(ToyServerOptions(port=0, api_key="toy-key-1")) as h:
        assert _with_auth(h.url, body, None) == (401, {"error": "Unauthorized"})  # vLLM's answer
        assert _with_auth(h.url, body, "Bearer toy-key-2")[0] == 401
        assert _with_auth(h.url, body, "Bearer toy-key-1")[0] == 200
        assert call(h.url, "/health")[0] == 200  # probes and the admin endpoints stay open
        assert ok(h.url, "/metrics")["errors_by_status"]["401"] == 2
        assert ok(h.url, "/admin/faults", {"echo_auth": True, "error_rate": 1.0})["faults"][
            "echo_auth"
        ]
        status, out = _with_auth(h.url, body, "Bearer toy-key-1")
        assert status == 503
        assert out["error"]["message"].endswith("(request Authorization: Bearer toy-key-1)")
        status, out = _with_auth(h.url, body, "Bearer nope")
        assert (status, out) == (
            401,
            {"error": "Unauthorized (request Authorization: Bearer nope)"},
        )
        status, out = call(h.url, "/admin/faults", {"echo_auth": 1})
        assert status == 400 and "echo_auth must be true or false" in out["error"]["message"]
    assert "toy-key-1" not in repr(ToyServerOptions(api_key="toy-key-1"))


def test_cli_reads_the_api_key_from_a_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import qalign.toy.cli as toy_cli

    seen: list[ToyServerOptions] = []

    async def capture(options: ToyServerOptions) -> None:
        seen.append(options)

    monkeypatch.setattr(toy_cli, "_serve_forever", capture)
    key_file = tmp_path / "toy.key"
    key_file.write_text("  toy-key-3\n")
    result = CliRunner().invoke(
        toy_server_command, ["--api-key-file", str(key_file), "--echo-auth"]
    )
    assert result.exit_code == 0, result.output
    assert seen[0].api_key == "toy-key-3" and seen[0].echo_auth
