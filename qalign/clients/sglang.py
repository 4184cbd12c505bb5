"""SGLang backends: native `POST /generate` on token ids, native `POST /classify` rewards.

Generation (docs/server-apis.md §3.1):
* `input_ids` + explicit `sampling_params` (SGLang also fills omitted ones from the model's
  generation config), `max_new_tokens` always, the per-request seed in `sampling_seed`
  (SGLang's field; servers that reject it are detected at `start()` and run unseeded — note
  that SGLang may only honour it with `--enable-deterministic-inference`), `no_stop_trim` and
  `skip_special_tokens: false`.
* Current SGLang returns every sampled id in `output_ids`, including the terminating EOS; the
  client still normalizes defensively: keeps the last `meta_info.completion_tokens` ids (old
  versions prefixed a few prompt ids) and appends `finish_reason.matched` when it is an int token
  id missing from the end.
* `return_logprob` → `meta_info.output_token_logprobs` = `[[logprob, token_id, text], ...]`.

Chat templating: SGLang's `/tokenize` takes text only (no `messages`), so `chat_prompt` needs
either `template_url` — any vLLM-compatible `/tokenize` server with the same tokenizer (e.g. a
vLLM instance of the same model) — or `chat_template`, a callable rendering messages to text
(then tokenized by SGLang with `add_special_tokens: false`). Otherwise `chat_prompt` raises
`TemplateUnavailableError`; callers may always build prompt ids themselves.

Rewards (§3.3): native `/classify` (the OpenAI `/v1/classify` applies softmax → always 1.0), with
`input_ids` templated through `template_url`, or `text` rendered by `render` (default
`render_plain`, an approximation of a chat template). `embedding[0]` is the raw score.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from qalign.clients.base import Continuation, Conversation, SamplingParams
from qalign.clients.cache import TextCache
from qalign.clients.errors import ClientError, ProtocolError, ServerRequestError
from qalign.clients.http import (
    EndpointPool,
    HttpSettings,
    TemplateUnavailableError,
    as_float,
    as_int_list,
    check_context,
    check_ids,
    check_vocab,
    first_number,
    require_dict,
    truncate_to_budget,
)
from qalign.clients.vllm import check_model_served, parse_tokenize
from qalign.core.state import Finish

log = logging.getLogger(__name__)

ChatRenderer = Callable[[Conversation], str]


def sglang_seed(seed: int) -> int:
    return int(seed) % (1 << 63)


def render_plain(conversation: Conversation) -> str:
    """Documented fallback rendering of a conversation as plain text (no chat template).

    Each turn becomes "<Role>: <content>" and turns are separated by a blank line, e.g.
    "User: What is 2 + 2?\\n\\nAssistant: 4." This only approximates what a reward model saw in
    training; prefer `template_url` for exact templating.
    """
    parts = []
    for message in conversation:
        role = str(message.get("role", "user")).strip() or "user"
        content = message.get("content", "")
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(f"{role[:1].upper()}{role[1:]}: {content}")
    return "\n\n".join(parts)


class _TemplateServer:
    """A vLLM-compatible `/tokenize` server used only to apply a chat template."""

    def __init__(self, url: str | Iterable[str], model: str, settings: HttpSettings) -> None:
        self.model = model
        self.pool = EndpointPool(url, settings, name=f"template server {model!r}")

    async def ids(self, messages: Conversation, *, add_generation_prompt: bool) -> list[int]:
        body = {
            "model": self.model,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "add_special_tokens": False,
        }
        reply = await self.pool.request("POST", "/tokenize", body, parse=parse_tokenize)
        return reply.value[0]


def _no_template(kind: str) -> TemplateUnavailableError:
    return TemplateUnavailableError(
        f"SGLang's /tokenize takes text only and cannot apply the chat template ({kind}). Pass"
        " template_url=<a vLLM-compatible /tokenize server with the same tokenizer, e.g. vLLM"
        " serving the same model>, or chat_template=<callable: messages -> prompt text>, or"
        " build the prompt token ids yourself."
    )


class SGLangGenerator:
    """`Generator` over SGLang's native `/generate` (one or more replicas)."""

    def __init__(
        self,
        urls: str | Iterable[str],
        model: str,
        *,
        settings: HttpSettings | None = None,
        max_model_len: int | None = None,
        template_url: str | Iterable[str] | None = None,
        template_model: str | None = None,
        chat_template: ChatRenderer | None = None,
        seed_field: str | None = "sampling_seed",
        check_model: bool = True,
        startup_timeout: float = 600.0,
        vocab_size: int | None = None,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size  # when given, generated ids are checked against it
        self.pool = EndpointPool(urls, settings, name=f"sglang generator {model!r}")
        self.texts = TextCache()  # detokenized responses: a repeat costs no request
        self.settings = self.pool.settings
        self.max_model_len = max_model_len
        self._user_max_model_len = max_model_len
        self.template = (
            _TemplateServer(template_url, template_model or model, self.settings)
            if template_url is not None
            else None
        )
        self.chat_template = chat_template
        self.seed_field = seed_field
        self.check_model = check_model
        self.startup_timeout = startup_timeout
        self.started = False

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    async def start(self) -> None:
        await self.pool.wait_healthy("/health", timeout=self.startup_timeout)
        info = await self.pool.try_get_json("/get_model_info")
        if isinstance(info, dict) and info.get("is_generation") is False:
            raise ClientError(
                f"SGLang server {', '.join(self.urls)} serves an embedding/reward model"
                f" ({info.get('model_path')!r}), not a generator"
            )
        server_len = None
        if self.check_model:
            server_len = await check_model_served(self.pool, self.model, backend="SGLang")
        if server_len is None:
            server_info = await self.pool.try_get_json("/get_server_info")
            if isinstance(server_info, dict):
                ctx = server_info.get("context_length")
                server_len = ctx if isinstance(ctx, int) and ctx > 0 else None
        if self._user_max_model_len is None:
            self.max_model_len = server_len
        elif server_len is not None:
            self.max_model_len = min(self._user_max_model_len, server_len)
        if self.template is not None:
            await self.template.pool.wait_healthy("/health", timeout=self.startup_timeout)
        if self.seed_field is not None:
            await self._probe_seed_field()
        self.started = True

    async def _probe_seed_field(self) -> None:
        ids = await self.tokenize_text("Hello")
        params = SamplingParams(temperature=1.0)
        try:
            await self._generate(ids or [0], max_tokens=1, seed=0, params=params)
        except ServerRequestError as exc:
            field, self.seed_field = self.seed_field, None
            try:
                await self._generate(ids or [0], max_tokens=1, seed=0, params=params)
            except ClientError:
                self.seed_field = field
                raise exc from None
            log.warning(
                "SGLang at %s rejects sampling_params.%s (%s); requests will be unseeded",
                ", ".join(self.urls),
                field,
                exc.message,
            )

    # -- tokenization --------------------------------------------------------------------

    async def tokenize_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        reply = await self.pool.request("POST", "/tokenize", body, parse=parse_tokenize)
        return reply.value[0]

    async def chat_prompt(self, messages: Conversation) -> list[int]:
        if self.template is not None:
            return await self.template.ids(messages, add_generation_prompt=True)
        if self.chat_template is not None:
            text = self.chat_template(list(messages))
            return await self.tokenize_text(text, add_special_tokens=False)
        raise _no_template("chat_prompt")

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        cached = self.texts.get(token_ids)
        if cached is not None:
            return cached
        body = {
            "model": self.model,
            "tokens": [int(t) for t in token_ids],
            "skip_special_tokens": False,
        }
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
    ) -> dict[str, Any]:
        sampling: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "min_new_tokens": 0,
            "temperature": float(params.temperature),
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
        }
        if params.stop_token_ids:
            sampling["stop_token_ids"] = [int(t) for t in params.stop_token_ids]
        if self.seed_field is not None:
            sampling[self.seed_field] = sglang_seed(seed)
        body: dict[str, Any] = {
            "input_ids": prompt_ids,
            "sampling_params": sampling,
            "stream": False,
        }
        if logprobs:
            body["return_logprob"] = True
            body["logprob_start_len"] = -1
            body["top_logprobs_num"] = 0
        return body

    async def _generate(
        self,
        ids: list[int],
        *,
        max_tokens: int,
        seed: int,
        params: SamplingParams,
        logprobs: bool = False,
        affinity: str | None = None,
    ) -> Continuation:
        body = self._body(ids, max_tokens=max_tokens, seed=seed, params=params, logprobs=logprobs)
        reply = await self.pool.request(
            "POST",
            "/generate",
            body,
            parse=lambda data: parse_generate(data, logprobs, self.vocab_size),
            affinity=affinity,
            timeout=self.settings.timeout(max_tokens),
        )
        out, finish, lps = reply.value
        out, lps, cut = truncate_to_budget(out, lps, max_tokens)
        return Continuation(
            token_ids=tuple(out),
            finish=Finish.LENGTH if cut else finish,
            logprobs=tuple(lps) if lps is not None else None,
            endpoint=reply.url,
            latency_s=reply.latency_s,
        )

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
        return await self._generate(
            ids,
            max_tokens=max_tokens,
            seed=seed,
            params=params,
            logprobs=logprobs,
            affinity=affinity,
        )

    async def close(self) -> None:
        await self.pool.close()
        if self.template is not None:
            await self.template.pool.close()


def parse_generate(
    data: Any, want_logprobs: bool, vocab_size: int | None = None
) -> tuple[list[int], Finish, list[float] | None]:
    """(ids ending with the stop token on STOP, finish, logprobs) of a native /generate answer."""
    if isinstance(data, list):
        if len(data) != 1:
            raise ProtocolError(f"expected one /generate result, got {len(data)}")
        data = data[0]
    body = require_dict(data, "/generate answer")
    meta = require_dict(body.get("meta_info"), "meta_info")
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    matched = reason.get("matched") if isinstance(reason, dict) else None
    if kind == "stop":
        finish = Finish.STOP
    elif kind == "length":
        finish = Finish.LENGTH
    else:  # abort / None
        raise ProtocolError(f"finish_reason {reason!r:.300}")
    ids = as_int_list(body.get("output_ids"), "output_ids")
    stop_ids: set[int] = set()
    if isinstance(matched, int) and not isinstance(matched, bool):
        stop_ids = {matched}
    elif isinstance(matched, list):
        stop_ids = {t for t in matched if isinstance(t, int) and not isinstance(t, bool)}
    n_completion = meta.get("completion_tokens")  # counts the stop token
    if isinstance(n_completion, int) and not isinstance(n_completion, bool):
        lacks_stop = (
            finish is Finish.STOP and bool(stop_ids) and (not ids or ids[-1] not in stop_ids)
        )
        expected = n_completion - 1 if lacks_stop else n_completion
        if len(ids) > expected >= 0:  # old servers prefixed a few prompt ids
            ids = ids[len(ids) - expected :]
    if finish is Finish.STOP:
        if isinstance(matched, str):
            raise ProtocolError(f"stopped on a stop string {matched!r}; none was requested")
        if stop_ids and (not ids or ids[-1] not in stop_ids):
            if len(stop_ids) != 1:
                raise ProtocolError(f"stop token {matched!r} missing from output_ids")
            ids.append(next(iter(stop_ids)))
        if not ids:
            raise ProtocolError("finish_reason 'stop' with no generated token")
    lps: list[float] | None = None
    if want_logprobs:
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list):
            raise ProtocolError("meta_info.output_token_logprobs is missing")
        lp_ids: list[int] = []
        lps = []
        for entry in entries:
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise ProtocolError(f"bad output_token_logprobs entry {entry!r:.100}")
            lps.append(as_float(entry[0], "logprob"))
            lp_ids.extend(as_int_list([entry[1]], "output_token_logprobs id"))
        if lp_ids != ids:
            raise ProtocolError(
                f"output_token_logprobs ids {lp_ids[-5:]}… disagree with output_ids {ids[-5:]}…"
            )
    check_vocab(ids, vocab_size, "output_ids")
    return ids, finish, lps


def _parse_detokenize(data: Any) -> str:
    body = require_dict(data, "/detokenize answer")
    text = body.get("text")
    if not isinstance(text, str):
        raise ProtocolError(f"/detokenize answer has no 'text' string: {body!r:.200}")
    return text


def parse_classify(data: Any, n: int) -> list[float]:
    """Raw scores `embedding[0]` from SGLang's native /classify (one object or a list)."""
    items = data if isinstance(data, list) else [data]
    if len(items) != n:
        raise ProtocolError(f"expected {n} /classify results, got {len(items)}")
    return [
        first_number(require_dict(item, "/classify result").get("embedding"), "embedding")
        for item in items
    ]


class SGLangReward:
    """`RewardModel` over SGLang's native `/classify` (`--is-embedding` reward models)."""

    def __init__(
        self,
        urls: str | Iterable[str],
        model: str,
        *,
        settings: HttpSettings | None = None,
        batch_size: int = 32,
        template_url: str | Iterable[str] | None = None,
        template_model: str | None = None,
        render: ChatRenderer | None = None,
        check_model: bool = True,
        startup_timeout: float = 600.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.pool = EndpointPool(urls, settings, name=f"sglang reward {model!r}")
        self.settings = self.pool.settings
        self.batch_size = batch_size
        self.template = (
            _TemplateServer(template_url, template_model or model, self.settings)
            if template_url is not None
            else None
        )
        self.render: ChatRenderer = render or render_plain
        self.check_model = check_model
        self.startup_timeout = startup_timeout
        self.started = False

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    async def start(self) -> None:
        await self.pool.wait_healthy("/health", timeout=self.startup_timeout)
        info = await self.pool.try_get_json("/get_model_info")
        if isinstance(info, dict) and info.get("is_generation") is True:
            log.warning(
                "SGLang server %s reports a generation model; /classify needs --is-embedding",
                ", ".join(self.urls),
            )
        if self.check_model:
            await check_model_served(self.pool, self.model, backend="SGLang")
        if self.template is not None:
            await self.template.pool.wait_healthy("/health", timeout=self.startup_timeout)
        elif self.render is render_plain:
            log.warning(
                "SGLang reward %s: no template_url, conversations are rendered as plain"
                " 'Role: content' text (render_plain), not with the reward model's template",
                self.model,
            )
        self.started = True

    async def _score_batch(self, batch: list[Conversation]) -> list[float]:
        body: dict[str, Any]
        if self.template is not None:
            template = self.template
            ids = await asyncio.gather(
                *(template.ids(c, add_generation_prompt=False) for c in batch)
            )
            body = {"input_ids": list(ids)}
        else:
            body = {"text": [self.render(list(c)) for c in batch]}
        n = len(batch)
        reply = await self.pool.request(
            "POST", "/classify", body, parse=lambda data: parse_classify(data, n)
        )
        return reply.value

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        if not conversations:
            return []
        convs = list(conversations)
        batches = [convs[i : i + self.batch_size] for i in range(0, len(convs), self.batch_size)]
        results = await asyncio.gather(*(self._score_batch(b) for b in batches))
        return [s for part in results for s in part]

    async def close(self) -> None:
        await self.pool.close()
        if self.template is not None:
            await self.template.pool.close()
