"""llama.cpp `llama-server` backend: native `POST /completion` on exact token ids.

(docs/server-apis.md §4.1, docs/real-servers.md §3.2)
* `prompt` is a token-id array, used verbatim (no BOS is inserted for token arrays).
* llama.cpp's sampling defaults are far from plain sampling (temperature 0.8, top_k 40,
  top_p 0.95, min_p 0.05, repeat_penalty 1.1 in older builds), so every sampler is neutralised
  explicitly; `seed` is a uint32 (0xFFFFFFFF means "random" and is never sent).
* `return_tokens: true` → `tokens`; `stop_type` "eos" → STOP, "limit" → LENGTH, "word" → STOP.
  If the answer lacks the terminating EOG token (compared with `tokens_predicted`), the EOS id
  (from `eos_token_id`, else `/props.eos_token` tokenized) is appended.
* `n_probs: 1` gives `completion_probabilities[i].{id, logprob}` per generated token; logprobs
  are the model's softmax before sampler transforms (temperature 1), as with vLLM.

Chat templating: `POST /apply-template {"messages"}` → `{"prompt"}`, then `POST /tokenize` with
`add_special: false, parse_special: true`. The template text may or may not carry the BOS text
(llama.cpp strips it in some versions and adds BOS when tokenizing with `add_special`), so the
client probes the model's BOS with `/tokenize {"content": "", "add_special": true}` and prepends it
exactly when the model uses one and the ids do not already start with it — never twice.

llama.cpp has no `stop_token_ids`: extra stop ids (beyond the model's end-of-generation tokens,
which always stop) are sent as `stop` strings of their text and verified on the way back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from qalign.clients.base import Continuation, Conversation, SamplingParams
from qalign.clients.cache import TextCache
from qalign.clients.errors import ModelNotServedError, ProtocolError
from qalign.clients.http import (
    ContextLengthError,
    EndpointPool,
    HttpSettings,
    as_float,
    as_int_list,
    check_context,
    check_ids,
    check_vocab,
    require_dict,
    truncate_to_budget,
)
from qalign.core.state import Finish

log = logging.getLogger(__name__)

_LLAMA_RANDOM_SEED = 0xFFFFFFFF


def llamacpp_seed(seed: int) -> int:
    """A uint32 seed that is never llama.cpp's "random seed" value 0xFFFFFFFF."""
    return int(seed) % _LLAMA_RANDOM_SEED


def _ids_from_tokenize(data: Any) -> list[int]:
    body = require_dict(data, "/tokenize answer")
    tokens = body.get("tokens")
    if isinstance(tokens, list) and tokens and isinstance(tokens[0], dict):  # with_pieces
        tokens = [t.get("id") for t in tokens]
    return as_int_list(tokens, "/tokenize tokens")


def _parse_apply_template(data: Any) -> str:
    body = require_dict(data, "/apply-template answer")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ProtocolError(f"/apply-template answer has no 'prompt' string: {body!r:.200}")
    return prompt


def _parse_detokenize(data: Any) -> str:
    body = require_dict(data, "/detokenize answer")
    text = body.get("content")
    if not isinstance(text, str):
        raise ProtocolError(f"/detokenize answer has no 'content' string: {body!r:.200}")
    return text


def _n_vocab(models: dict[str, Any]) -> int | None:
    """The vocabulary size llama-server reports in `/v1/models` (`data[0].meta.n_vocab`)."""
    items = models.get("data")
    first = items[0] if isinstance(items, list) and items else None
    meta = first.get("meta") if isinstance(first, dict) else None
    n = meta.get("n_vocab") if isinstance(meta, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _stop_kind(body: dict[str, Any]) -> str:
    kind = body.get("stop_type")
    if isinstance(kind, str):
        return kind
    # older builds: booleans
    if body.get("stopped_eos"):
        return "eos"
    if body.get("stopped_word"):
        return "word"
    if body.get("stopped_limit"):
        return "limit"
    return "none"


class LlamaCppGenerator:
    """`Generator` over llama.cpp's `llama-server` (one or more replicas)."""

    def __init__(
        self,
        urls: str | Iterable[str],
        model: str = "",
        *,
        settings: HttpSettings | None = None,
        max_model_len: int | None = None,
        eos_token_id: int | None = None,
        check_model: bool = True,
        startup_timeout: float = 600.0,
        vocab_size: int | None = None,
    ) -> None:
        self.model = model
        # Else read from /v1/models `meta.n_vocab` at start(); generated ids are checked against it.
        self.vocab_size = vocab_size
        self.pool = EndpointPool(urls, settings, name=f"llama.cpp generator {model!r}")
        self.texts = TextCache()  # detokenized responses: a repeat costs no request
        self.settings = self.pool.settings
        self.max_model_len = max_model_len
        self._user_max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.check_model = check_model
        self.startup_timeout = startup_timeout
        self.bos_ids: list[int] | None = None  # what tokenize(add_special) prepends; [] = none
        self.props: dict[str, Any] = {}
        self._stop_pieces: dict[int, str] = {}
        self.started = False

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    # -- startup -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.wait_healthy("/health", timeout=self.startup_timeout)
        props = await self.pool.try_get_json("/props")
        self.props = props if isinstance(props, dict) else {}
        models = await self.pool.try_get_json("/v1/models")
        if self.check_model and self.model and isinstance(models, dict):
            self._check_model(models)
        if self.vocab_size is None and isinstance(models, dict):
            self.vocab_size = _n_vocab(models)
        n_ctx = self._props_n_ctx()
        if self._user_max_model_len is None:
            self.max_model_len = n_ctx
        elif n_ctx is not None:
            self.max_model_len = min(self._user_max_model_len, n_ctx)
        await self._special_ids()
        log.info(
            "llama.cpp generator at %s: n_ctx=%s, bos=%s, eos=%s",
            ", ".join(self.urls),
            self.max_model_len,
            self.bos_ids,
            self.eos_token_id,
        )
        self.started = True

    def _check_model(self, models: dict[str, Any]) -> None:
        items = models.get("data")
        if not isinstance(items, list):
            return
        names = [m.get("id") for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]
        aliases = set(names)
        for m in items:
            if isinstance(m, dict) and isinstance(m.get("aliases"), list):
                aliases.update(a for a in m["aliases"] if isinstance(a, str))
        path = self.props.get("model_path")
        if isinstance(path, str):
            aliases.update({path, path.rsplit("/", 1)[-1]})
        if names and self.model not in aliases:
            raise ModelNotServedError(
                f"llama.cpp server {', '.join(self.urls)} does not serve model {self.model!r};"
                f" it serves: {', '.join(map(repr, names))} (set with --alias)"
            )

    def _props_n_ctx(self) -> int | None:
        settings = self.props.get("default_generation_settings")
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if n_ctx is None:
            n_ctx = self.props.get("n_ctx")
        if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
            return n_ctx
        return None

    async def _special_ids(self) -> None:
        if self.bos_ids is None:
            ids = await self._tokenize("", add_special=True)
            self.bos_ids = ids[:1]
        if self.eos_token_id is None:
            eos_text = self.props.get("eos_token")
            if isinstance(eos_text, str) and eos_text:
                ids = await self._tokenize(eos_text, add_special=False)
                if len(ids) == 1:
                    self.eos_token_id = ids[0]
            if self.eos_token_id is None:
                log.warning(
                    "llama.cpp at %s: EOS token id unknown (no /props.eos_token); pass"
                    " eos_token_id= if the server omits EOS from `tokens`",
                    ", ".join(self.urls),
                )

    # -- tokenization --------------------------------------------------------------------

    async def _tokenize(self, text: str, *, add_special: bool) -> list[int]:
        body = {"content": text, "add_special": add_special, "parse_special": True}
        reply = await self.pool.request("POST", "/tokenize", body, parse=_ids_from_tokenize)
        return reply.value

    async def chat_prompt(self, messages: Conversation) -> list[int]:
        body = {"messages": list(messages)}
        reply = await self.pool.request(
            "POST", "/apply-template", body, parse=_parse_apply_template
        )
        ids = await self._tokenize(reply.value, add_special=False)
        if self.bos_ids is None:
            self.bos_ids = (await self._tokenize("", add_special=True))[:1]
        bos = self.bos_ids
        if bos and ids[: len(bos)] != bos:
            ids = bos + ids
        return ids

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        cached = self.texts.get(token_ids)
        if cached is not None:
            return cached
        body = {"tokens": [int(t) for t in token_ids]}
        reply = await self.pool.request("POST", "/detokenize", body, parse=_parse_detokenize)
        self.texts.put(token_ids, reply.value)
        return reply.value

    # -- generation ----------------------------------------------------------------------

    async def _stop_strings(self, stop_ids: Sequence[int]) -> list[str]:
        out: list[str] = []
        for tok in stop_ids:
            if tok == self.eos_token_id:
                continue  # end-of-generation tokens always stop
            if tok not in self._stop_pieces:
                self._stop_pieces[tok] = await self.detokenize([tok])
            piece = self._stop_pieces[tok]
            if piece:
                out.append(piece)
            else:
                log.warning(
                    "llama.cpp cannot stop on token %d (it renders as empty text); only"
                    " end-of-generation tokens stop it",
                    tok,
                )
        return out

    def _body(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        seed: int,
        params: SamplingParams,
        logprobs: bool,
        stop: list[str],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt_ids,
            "n_predict": max_tokens,
            "temperature": float(params.temperature),
            "dynatemp_range": 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "min_p": 0.0,
            "typical_p": 1.0,
            "top_n_sigma": -1.0,
            "xtc_probability": 0.0,
            "repeat_penalty": 1.0,
            "repeat_last_n": 0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "dry_multiplier": 0.0,
            "mirostat": 0,
            "ignore_eos": False,
            "seed": llamacpp_seed(seed),
            "return_tokens": True,
            "cache_prompt": True,
            "stream": False,
            "n_probs": 1 if logprobs else 0,
            "post_sampling_probs": False,
        }
        if stop:
            body["stop"] = stop
        if self.model:
            body["model"] = self.model
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
        stop = await self._stop_strings(params.stop_token_ids) if params.stop_token_ids else []
        stop_ids = {int(t) for t in params.stop_token_ids}
        body = self._body(
            ids, max_tokens=max_tokens, seed=seed, params=params, logprobs=logprobs, stop=stop
        )
        reply = await self.pool.request(
            "POST",
            "/completion",
            body,
            parse=lambda data: self.parse_completion(data, logprobs, stop_ids),
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

    def parse_completion(
        self, data: Any, want_logprobs: bool, stop_ids: set[int] | None = None
    ) -> tuple[list[int], Finish, list[float] | None]:
        body = require_dict(data, "/completion answer")
        if body.get("truncated") is True:
            raise ContextLengthError(
                f"{self.pool.name}: the server truncated the prompt (context window exceeded)"
            )
        kind = _stop_kind(body)
        if kind in ("eos", "word"):
            finish = Finish.STOP
        elif kind == "limit":
            finish = Finish.LENGTH
        else:
            raise ProtocolError(f"stop_type {kind!r}: the completion did not finish")
        probs = body.get("completion_probabilities")
        if probs is None:
            probs = body.get("probs")
        prob_ids: list[int] | None = None
        lps: list[float] | None = None
        if isinstance(probs, list) and probs:
            entries = [require_dict(p, "completion_probabilities entry") for p in probs]
            if all("id" in e for e in entries):
                prob_ids = as_int_list([e["id"] for e in entries], "completion_probabilities ids")
            if want_logprobs:
                if not all("logprob" in e for e in entries):
                    raise ProtocolError("completion_probabilities entries carry no 'logprob'")
                lps = [as_float(e["logprob"], "logprob") for e in entries]
        elif want_logprobs and kind != "none":
            raise ProtocolError("completion_probabilities missing although n_probs was set")
        tokens = body.get("tokens")
        ids = as_int_list(tokens, "tokens") if tokens is not None else []
        if not ids and prob_ids:
            ids = list(prob_ids)  # server ignored return_tokens
        predicted = body.get("tokens_predicted")
        if not isinstance(predicted, int) or isinstance(predicted, bool):
            timings = body.get("timings")
            predicted = timings.get("predicted_n") if isinstance(timings, dict) else None
        if kind == "eos":
            eos = self.eos_token_id
            if isinstance(predicted, int):  # the server counts the EOS among predicted tokens
                missing = len(ids) == predicted - 1
            else:
                missing = not ids or (eos is not None and ids[-1] != eos)
            if missing:
                if eos is None:
                    raise ProtocolError(
                        "the answer lacks the EOS token and its id is unknown (pass eos_token_id=)"
                    )
                ids.append(eos)
        elif kind == "word" and (not stop_ids or not ids or ids[-1] not in stop_ids):
            raise ProtocolError("a stop string matched inside ordinary text, not on a stop token")
        if lps is not None and len(lps) != len(ids):
            raise ProtocolError(f"{len(lps)} logprobs for {len(ids)} generated tokens")
        check_vocab(ids, self.vocab_size, "tokens")
        return ids, finish, lps

    async def close(self) -> None:
        await self.pool.close()
