"""vLLM backends: `/v1/completions` on exact token ids, and `/classify` (or `/pooling`) rewards.

Generation (see docs/server-apis.md §1):
* prompts are token ids (from `POST /tokenize` with `messages`), used verbatim by the server;
* every sampling parameter is sent explicitly (vLLM otherwise fills them from the model's
  `generation_config.json`), with `max_tokens`, `n: 1` and a per-request `seed`;
* the sampled ids come from `return_token_ids` (vLLM >= 0.10.2) or, on older servers, from
  `logprobs: 0` + `return_tokens_as_token_ids` (`"token_id:N"` strings). Which one is used is
  detected at `start()` (`/openapi.json`, else a one-token probe).

Rewards (§2): a conversation is scored by ONE `POST /classify` in chat form (`messages`, no
generation prompt, no added special tokens: the server applies the reward model's own chat
template) with `use_activation: false`, so `probs[0]` is the raw logit and a step costs the
reward server one request. Servers without the chat form (older vLLM), or whose chat form
scores the probe conversation differently from its token-id form, are detected at `start()`;
they get the conversation templated by the reward server's own `POST /tokenize` and token-id
batches in `/classify` instead. Servers that ignore `use_activation` (always sigmoid) are
detected at `start()` too and their probabilities mapped back with logit(p).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from qalign.clients.base import Continuation, Conversation, SamplingParams
from qalign.clients.cache import TextCache
from qalign.clients.errors import ClientError, ModelNotServedError, ProtocolError
from qalign.clients.http import (
    EndpointPool,
    HttpSettings,
    as_float,
    as_int_list,
    check_context,
    check_ids,
    check_vocab,
    first_number,
    logit,
    require_dict,
    truncate_to_budget,
)
from qalign.core.state import Finish

log = logging.getLogger(__name__)

_TOKEN_ID_RE = re.compile(r"^token_id:(\d+)$")

#: A short conversation used to probe reward servers at startup.
PROBE_CONVERSATION: Conversation = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]

TokenIdsMode = Literal["auto", "token_ids", "logprobs"]


def vllm_seed(seed: int) -> int:
    """vLLM takes a signed 64-bit seed; fold any Python int into [0, 2**63)."""
    return int(seed) % (1 << 63)


def parse_token_id_strings(tokens: Any, what: str = "logprobs.tokens") -> list[int]:
    """Ids from vLLM's `return_tokens_as_token_ids` strings ("token_id:1234")."""
    if not isinstance(tokens, list):
        raise ProtocolError(f"{what} is not a list: {tokens!r:.200}")
    out: list[int] = []
    for tok in tokens:
        m = _TOKEN_ID_RE.match(tok) if isinstance(tok, str) else None
        if m is None:
            raise ProtocolError(
                f"{what} entry {tok!r} is not 'token_id:N' (this vLLM predates the"
                " return_tokens_as_token_ids request field; upgrade it or start it with"
                " --return-tokens-as-token-ids)"
            )
        out.append(int(m.group(1)))
    return out


def served_model_names(data: Any) -> list[tuple[str, str | None, int | None]]:
    """(id, root, max_model_len) of every model in a `/v1/models` answer."""
    body = require_dict(data, "/v1/models answer")
    items = body.get("data")
    if not isinstance(items, list):
        raise ProtocolError("/v1/models answer has no 'data' list")
    out: list[tuple[str, str | None, int | None]] = []
    for item in items:
        entry = require_dict(item, "/v1/models entry")
        ident = entry.get("id")
        if not isinstance(ident, str):
            raise ProtocolError(f"/v1/models entry without a string id: {entry!r:.200}")
        root = entry.get("root")
        mml = entry.get("max_model_len")
        out.append(
            (
                ident,
                root if isinstance(root, str) else None,
                mml if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0 else None,
            )
        )
    return out


async def check_model_served(
    pool: EndpointPool, model: str, *, backend: str = "vLLM"
) -> int | None:
    """Raise ModelNotServedError unless every replica serves `model`; its max_model_len."""
    max_len: int | None = None
    for url in pool.urls:
        if not pool.endpoint(url).healthy(time.monotonic()):
            continue
        reply = await pool.get_json("/v1/models", endpoint=url)
        models = served_model_names(reply.value)
        match = [m for m in models if m[0] == model]
        if not match:
            names = ", ".join(repr(m[0]) for m in models) or "(none)"
            roots = [m[1] for m in models if m[1] and m[1] != m[0]]
            hint = f" (model paths: {', '.join(map(repr, roots))})" if roots else ""
            raise ModelNotServedError(
                f"{backend} server {url} does not serve model {model!r}; it serves: {names}{hint}."
                " Pass one of these names (vLLM's --served-model-name)."
            )
        mml = match[0][2]
        if mml is not None:
            max_len = mml if max_len is None else min(max_len, mml)
    return max_len


def _completion_schema_has(openapi: Any, field: str) -> bool | None:
    """Whether the completion request schema in /openapi.json has `field` (None: no schema)."""
    if not isinstance(openapi, dict):
        return None
    schemas = openapi.get("components", {}).get("schemas", {})
    if not isinstance(schemas, dict):
        return None
    found = False
    for schema in schemas.values():
        props = schema.get("properties") if isinstance(schema, dict) else None
        if isinstance(props, dict) and "prompt" in props and "max_tokens" in props:
            found = True
            if field in props:
                return True
    return False if found else None


class VLLMGenerator:
    """`Generator` over vLLM's OpenAI-compatible server (one or more replicas)."""

    def __init__(
        self,
        urls: str | Iterable[str],
        model: str,
        *,
        settings: HttpSettings | None = None,
        max_model_len: int | None = None,
        startup_timeout: float = 600.0,
        token_ids_mode: TokenIdsMode = "auto",
        vocab_size: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        # sent with every chat-templated /tokenize (e.g. {"enable_thinking": true} for Qwen3)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        # vLLM does not report its vocabulary size; when given, generated ids are checked.
        self.vocab_size = vocab_size
        self.pool = EndpointPool(urls, settings, name=f"vllm generator {model!r}")
        self.texts = TextCache()  # detokenized responses: a repeat costs no request
        self.settings = self.pool.settings
        self.max_model_len = max_model_len
        self._user_max_model_len = max_model_len
        self.startup_timeout = startup_timeout
        self.token_ids_mode: TokenIdsMode = token_ids_mode
        self.started = False

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    # -- startup -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.wait_healthy("/health", timeout=self.startup_timeout)
        server_len = await check_model_served(self.pool, self.model)
        if self._user_max_model_len is None:
            self.max_model_len = server_len
        elif server_len is not None and self._user_max_model_len > server_len:
            log.warning(
                "max_model_len=%d is larger than the server's %d; using the server's",
                self._user_max_model_len,
                server_len,
            )
            self.max_model_len = server_len
        if self.token_ids_mode == "auto":
            self.token_ids_mode = await self._detect_token_ids_mode()
        log.info(
            "vLLM generator %s at %s: max_model_len=%s, token ids via %s",
            self.model,
            ", ".join(self.urls),
            self.max_model_len,
            self.token_ids_mode,
        )
        self.started = True

    async def _detect_token_ids_mode(self) -> TokenIdsMode:
        schema = await self.pool.try_get_json("/openapi.json")
        has = _completion_schema_has(schema, "return_token_ids")
        if has is True:
            return "token_ids"
        # No schema, or a schema without the field: a one-token probe decides (and checks that
        # the fallback really returns "token_id:N" strings).
        probe_ids = await self.tokenize_text("Hello")
        body = self._body(
            probe_ids or [0],
            max_tokens=1,
            seed=0,
            params=SamplingParams(temperature=1.0),
            logprobs=True,
            mode="token_ids",
        )
        body["return_tokens_as_token_ids"] = True
        reply = await self.pool.request("POST", "/v1/completions", body, parse=_as_dict)
        choice = _first_choice(reply.value)
        if isinstance(choice.get("token_ids"), list):
            return "token_ids"
        lp = choice.get("logprobs")
        parse_token_id_strings(lp.get("tokens") if isinstance(lp, dict) else None)
        log.warning(
            "vLLM at %s does not return `token_ids` (older than 0.10.2?): reading ids from"
            " logprobs with return_tokens_as_token_ids",
            reply.url,
        )
        return "logprobs"

    # -- tokenization --------------------------------------------------------------------

    async def chat_prompt(self, messages: Conversation) -> list[int]:
        return await self._chat_ids(messages, add_generation_prompt=True)

    async def conversation_ids(self, messages: Conversation) -> list[int]:
        """Token ids of a whole conversation (ending with its assistant reply), templated."""
        return await self._chat_ids(messages, add_generation_prompt=False)

    async def _chat_ids(self, messages: Conversation, *, add_generation_prompt: bool) -> list[int]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "add_special_tokens": False,
        }
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        reply = await self.pool.request("POST", "/tokenize", body, parse=parse_tokenize)
        ids, mml = reply.value
        if self.max_model_len is None and mml is not None:
            self.max_model_len = mml
        return ids

    async def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float | None]:
        """log p(t_i | t_<i) of every token of `token_ids` under the served model (None first).

        One /v1/completions request with `prompt_logprobs=0` and a single generated token.
        """
        ids = check_ids(token_ids, 1)
        check_context(self.pool.name, len(ids), 1, self.max_model_len)
        body = self._body(
            ids,
            max_tokens=1,
            seed=0,
            params=SamplingParams(temperature=1.0),
            logprobs=False,
            mode="token_ids",
        )
        body.pop("return_token_ids", None)
        body["prompt_logprobs"] = 0
        reply = await self.pool.request(
            "POST",
            "/v1/completions",
            body,
            parse=functools.partial(parse_prompt_logprobs, prompt=ids),
            timeout=self.settings.timeout(1),
        )
        return reply.value

    async def tokenize_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        reply = await self.pool.request("POST", "/tokenize", body, parse=parse_tokenize)
        return reply.value[0]

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        cached = self.texts.get(token_ids)
        if cached is not None:
            return cached
        body = {"model": self.model, "tokens": [int(t) for t in token_ids]}
        reply = await self.pool.request("POST", "/detokenize", body, parse=_parse_detokenize)
        self.texts.put(token_ids, reply.value)
        return reply.value

    # -- generation ----------------------------------------------------------------------

    def _body(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        seed: int,
        params: SamplingParams,
        logprobs: bool,
        mode: TokenIdsMode,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "n": 1,
            "temperature": float(params.temperature),
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "min_tokens": 0,
            "ignore_eos": False,
            "seed": vllm_seed(seed),
            "stream": False,
            "skip_special_tokens": False,  # text is display-only; keep it faithful to the ids
        }
        if params.stop_token_ids:
            body["stop_token_ids"] = [int(t) for t in params.stop_token_ids]
        if mode != "logprobs":
            body["return_token_ids"] = True
        if logprobs or mode == "logprobs":
            body["logprobs"] = 0
        if mode == "logprobs":
            body["return_tokens_as_token_ids"] = True
        return body

    async def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        seed: int,
        params: SamplingParams,
        logprobs: bool = False,
        affinity: str | None = None,
    ) -> Continuation:
        ids = check_ids(prompt_ids, max_tokens)
        check_context(self.pool.name, len(ids), max_tokens, self.max_model_len)
        mode = self.token_ids_mode
        for _ in range(2):
            body = self._body(
                ids, max_tokens=max_tokens, seed=seed, params=params, logprobs=logprobs, mode=mode
            )
            reply = await self.pool.request(
                "POST",
                "/v1/completions",
                body,
                parse=functools.partial(
                    _parse_completion,
                    mode=mode,
                    want_logprobs=logprobs,
                    vocab_size=self.vocab_size,
                ),
                affinity=affinity,
                timeout=self.settings.timeout(max_tokens),
            )
            parsed = reply.value
            if parsed is None:  # "auto" mode and the server sent no token_ids: fall back once
                log.warning("vLLM at %s sent no token_ids; switching to logprobs ids", reply.url)
                mode = self.token_ids_mode = "logprobs"
                continue
            out, finish, lps = parsed
            out, lps, cut = truncate_to_budget(out, lps, max_tokens)
            return Continuation(
                token_ids=tuple(out),
                finish=Finish.LENGTH if cut else finish,
                logprobs=tuple(lps) if lps is not None else None,
                endpoint=reply.url,
                latency_s=reply.latency_s,
            )
        raise ProtocolError(f"{self.pool.name}: the server returns no generated token ids")

    async def close(self) -> None:
        await self.pool.close()


def _as_dict(data: Any) -> dict[str, Any]:
    return require_dict(data, "answer")


def _first_choice(data: Any) -> dict[str, Any]:
    body = require_dict(data, "completion answer")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ProtocolError(f"completion answer has no choices: {body!r:.300}")
    return require_dict(choices[0], "choices[0]")


def _parse_completion(
    data: Any, mode: TokenIdsMode, want_logprobs: bool, vocab_size: int | None = None
) -> tuple[list[int], Finish, list[float] | None] | None:
    choice = _first_choice(data)
    reason = choice.get("finish_reason")
    stop_reason = choice.get("stop_reason")
    if reason == "stop":
        finish = Finish.STOP
    elif reason == "length":
        finish = Finish.LENGTH
    else:  # abort / error / None: the request did not complete
        raise ProtocolError(f"finish_reason {reason!r} (stop_reason {stop_reason!r})")
    lp = choice.get("logprobs")
    if mode == "logprobs":
        if not isinstance(lp, dict):
            raise ProtocolError("choices[0].logprobs is missing (needed for token ids)")
        ids = parse_token_id_strings(lp.get("tokens"))
    else:
        raw = choice.get("token_ids")
        if raw is None:
            if mode == "auto":
                return None
            raise ProtocolError("choices[0].token_ids is missing (was return_token_ids ignored?)")
        ids = as_int_list(raw, "choices[0].token_ids")
    lps: list[float] | None = None
    if want_logprobs:
        if not isinstance(lp, dict):
            raise ProtocolError("choices[0].logprobs is missing")
        raw_lps = lp.get("token_logprobs")
        if not isinstance(raw_lps, list):
            raise ProtocolError("choices[0].logprobs.token_logprobs is not a list")
        lps = [as_float(x, "token_logprobs entry") for x in raw_lps]
        if len(lps) != len(ids):
            raise ProtocolError(f"{len(lps)} token_logprobs for {len(ids)} token ids")
    if finish is Finish.STOP:
        if isinstance(stop_reason, int) and not isinstance(stop_reason, bool):
            if not ids or ids[-1] != stop_reason:
                if lps is not None:
                    raise ProtocolError("the stop token is missing from token_ids and logprobs")
                ids.append(stop_reason)
        elif isinstance(stop_reason, str):
            raise ProtocolError(f"stopped on a stop string {stop_reason!r}; none was requested")
        if not ids:
            raise ProtocolError("finish_reason 'stop' with no generated token")
    check_vocab(ids, vocab_size, "choices[0].token_ids")
    return ids, finish, lps


def parse_prompt_logprobs(data: Any, prompt: Sequence[int]) -> list[float | None]:
    """The prompt tokens' log-probs of a completion answer (`prompt_logprobs` requested).

    vLLM sends one entry per prompt token: null for the first, then a map from token id (as a
    string) to {"logprob", "rank", "decoded_token"} that always holds the prompt's own token.
    """
    raw = _first_choice(data).get("prompt_logprobs")
    if not isinstance(raw, list) or len(raw) != len(prompt):
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise ProtocolError(
            f"choices[0].prompt_logprobs has {got} entries for {len(prompt)} prompt tokens "
            "(does this server support prompt_logprobs?)"
        )
    out: list[float | None] = []
    for i, (entry, tok) in enumerate(zip(raw, prompt, strict=True)):
        if entry is None:
            if i:
                raise ProtocolError(f"prompt_logprobs[{i}] is null (only the first may be)")
            out.append(None)
            continue
        cell = require_dict(entry, f"prompt_logprobs[{i}]").get(str(tok))
        if isinstance(cell, dict):
            cell = cell.get("logprob")
        if cell is None:
            raise ProtocolError(f"prompt_logprobs[{i}] has no entry for prompt token {tok}")
        out.append(as_float(cell, f"prompt_logprobs[{i}]"))
    return out


def parse_tokenize(data: Any) -> tuple[list[int], int | None]:
    body = require_dict(data, "/tokenize answer")
    ids = as_int_list(body.get("tokens"), "/tokenize tokens")
    mml = body.get("max_model_len")
    return ids, (mml if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0 else None)


def _parse_detokenize(data: Any) -> str:
    body = require_dict(data, "/detokenize answer")
    text = body.get("prompt")
    if not isinstance(text, str):
        raise ProtocolError(f"/detokenize answer has no 'prompt' string: {body!r:.200}")
    return text


def _parse_scores(data: Any, n: int, field: Literal["probs", "data"]) -> list[float]:
    body = require_dict(data, "scores answer")
    items = body.get("data")
    if not isinstance(items, list) or len(items) != n:
        got = len(items) if isinstance(items, list) else items
        raise ProtocolError(f"expected {n} results in 'data', got {got!r:.100}")
    by_index: dict[int, float] = {}
    for pos, item in enumerate(items):
        entry = require_dict(item, "data entry")
        idx = entry.get("index", pos)
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n or idx in by_index:
            raise ProtocolError(f"bad or repeated result index {idx!r}")
        by_index[idx] = first_number(entry.get(field), f"data[{idx}].{field}")
    return [by_index[i] for i in range(n)]


def _parse_chat_score(data: Any) -> tuple[float, int]:
    (score,) = _parse_scores(data, 1, "probs")
    usage = require_dict(data, "/classify answer").get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool):
        raise ProtocolError(f"/classify answer has no usage.prompt_tokens: {usage!r:.200}")
    return score, tokens


ActivationMode = Literal["auto", "raw", "sigmoid"]
InputForm = Literal["auto", "messages", "ids"]


class VLLMReward:
    """`RewardModel` over a vLLM pooling server (`--runner pooling`, a 1-label classifier)."""

    def __init__(
        self,
        urls: str | Iterable[str],
        model: str,
        *,
        settings: HttpSettings | None = None,
        batch_size: int = 32,
        endpoint: Literal["classify", "pooling"] = "classify",
        activation: ActivationMode = "auto",
        startup_timeout: float = 600.0,
        tokenize_concurrency: int = 64,
        pooling_task: str | None = None,
        input_form: InputForm = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if endpoint not in ("classify", "pooling"):
            raise ValueError(f"endpoint must be 'classify' or 'pooling', not {endpoint!r}")
        self.model = model
        self.pool = EndpointPool(urls, settings, name=f"vllm reward {model!r}")
        self.settings = self.pool.settings
        self.batch_size = batch_size
        self.endpoint = endpoint
        self.activation: ActivationMode = activation
        self.startup_timeout = startup_timeout
        self.pooling_task = pooling_task
        # /pooling's chat form is older and its task defaults moved between versions: token ids
        self.input_form: InputForm = input_form if endpoint == "classify" else "ids"
        self.max_model_len: int | None = None
        self._tokenize_limit = asyncio.Semaphore(max(1, tokenize_concurrency))
        self.started = False

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    async def start(self) -> None:
        await self.pool.wait_healthy("/health", timeout=self.startup_timeout)
        self.max_model_len = await check_model_served(self.pool, self.model)
        raw: float | None = None  # the probe conversation's score with use_activation false
        if self.input_form == "auto":
            self.input_form, raw = await self._detect_input_form()
        if self.activation == "auto":
            self.activation = await self._detect_activation(raw)
        self.started = True

    async def _detect_input_form(self) -> tuple[InputForm, float]:
        """Score the probe conversation in token-id form and in chat form: the chat form (one
        request per conversation instead of two) is used only where it answers, and answers
        what the token ids of the server's own template get. Returns the form and its raw
        score of the probe."""
        ids = await self.conversation_ids(PROBE_CONVERSATION)
        by_ids = (await self._score_batch([ids], use_activation=False))[0]
        try:
            by_messages, _ = await self._score_messages(PROBE_CONVERSATION, use_activation=False)
        except ClientError as exc:
            log.info("reward server %s: no chat-form /classify (%s)", self.pool.name, exc)
            return "ids", by_ids
        if not math.isclose(by_ids, by_messages, rel_tol=1e-3, abs_tol=1e-3):
            log.warning(
                "reward server %s scores the probe conversation %r in chat form but %r from"
                " its own /tokenize ids; using token ids (two requests per score)",
                ", ".join(self.urls),
                by_messages,
                by_ids,
            )
            return "ids", by_ids
        return "messages", by_messages

    async def _probe_score(self, use_activation: bool) -> float:
        if self.input_form == "messages":
            score, _ = await self._score_messages(PROBE_CONVERSATION, use_activation=use_activation)
            return score
        ids = await self.conversation_ids(PROBE_CONVERSATION)
        return (await self._score_batch([ids], use_activation=use_activation))[0]

    async def _detect_activation(self, raw: float | None = None) -> ActivationMode:
        """Score one conversation with use_activation false and true: equal values in [0, 1]
        mean the server ignores the flag and always applies sigmoid."""
        if raw is None:
            raw = await self._probe_score(False)
        act = await self._probe_score(True)
        # A sigmoid output lies strictly inside (0, 1); a raw 0.0 (common for a neutral probe)
        # from a server that ignores the flag is a logit, not a probability.
        if math.isclose(raw, act, rel_tol=1e-6, abs_tol=1e-9) and 0.0 < raw < 1.0:
            log.warning(
                "reward server %s ignores use_activation (probe: %r with and without): it"
                " returns sigmoid probabilities; converting with logit(p). Rewards near 0/1"
                " lose precision; prefer a vLLM >= 0.11.1 or --pooler-config"
                " '{\"use_activation\": false}'.",
                ", ".join(self.urls),
                raw,
            )
            return "sigmoid"
        return "raw"

    async def conversation_ids(self, conversation: Conversation) -> list[int]:
        """Token ids of a whole conversation in the reward model's own chat template."""
        body = {
            "model": self.model,
            "messages": list(conversation),
            "add_generation_prompt": False,
            "add_special_tokens": False,
        }
        async with self._tokenize_limit:
            reply = await self.pool.request("POST", "/tokenize", body, parse=parse_tokenize)
        ids, mml = reply.value
        if self.max_model_len is None and mml is not None:
            self.max_model_len = mml
        return ids

    async def _score_batch(self, batch: list[list[int]], *, use_activation: bool) -> list[float]:
        field: Literal["probs", "data"]
        body: dict[str, Any] = {
            "model": self.model,
            "input": batch,
            "use_activation": use_activation,
        }
        if self.endpoint == "classify":
            path, field = "/classify", "probs"
        else:
            path, field = "/pooling", "data"
            body["encoding_format"] = "float"
            if self.pooling_task:
                body["task"] = self.pooling_task
        n = len(batch)
        reply = await self.pool.request(
            "POST", path, body, parse=lambda data: _parse_scores(data, n, field)
        )
        return reply.value

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        scores, _ = await self.score_with_tokens(conversations)
        return scores

    async def _score_messages(
        self, conversation: Conversation, *, use_activation: bool
    ) -> tuple[float, int]:
        """One conversation scored by chat-form `/classify`, and the tokens the server read."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(conversation),
            "add_generation_prompt": False,
            "add_special_tokens": False,
            "use_activation": use_activation,
        }
        reply = await self.pool.request("POST", "/classify", body, parse=_parse_chat_score)
        return reply.value

    async def score_with_tokens(
        self, conversations: Sequence[Conversation]
    ) -> tuple[list[float], list[int]]:
        """Raw rewards and the number of tokens the reward model read for each conversation."""
        if not conversations:
            return [], []
        if self.input_form == "messages" and len(conversations) == 1:
            # A step scores one conversation: one request. (Many at once, as `qalign score`
            # sends them, go as token-id batches of batch_size.) An over-long conversation is
            # refused by the server, with an HTTP 400 naming its limit.
            score, tokens = await self._score_messages(conversations[0], use_activation=False)
            return [logit(score) if self.activation == "sigmoid" else score], [tokens]
        ids = await asyncio.gather(*(self.conversation_ids(c) for c in conversations))
        if self.max_model_len is not None:
            for i, seq in enumerate(ids):
                if len(seq) > self.max_model_len:
                    raise ClientError(
                        f"{self.pool.name}: conversation {i} has {len(seq)} tokens, more than the"
                        f" reward server's max_model_len {self.max_model_len}"
                    )
        batches = [list(ids[i : i + self.batch_size]) for i in range(0, len(ids), self.batch_size)]
        results = await asyncio.gather(
            *(self._score_batch(b, use_activation=False) for b in batches)
        )
        scores = [s for part in results for s in part]
        if self.activation == "sigmoid":
            scores = [logit(p) for p in scores]
        return scores, [len(seq) for seq in ids]

    async def close(self) -> None:
        await self.pool.close()
