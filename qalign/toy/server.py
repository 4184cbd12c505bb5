"""An aiohttp server that speaks the vLLM and SGLang HTTP protocols, backed by `ToyModel`.

Our HTTP clients are tested against it, and because the model is the toy bigram LM the exact
target distribution of any run is known. One app serves every endpoint at once:

vLLM (OpenAI-compatible) generator
    ``GET /health``, ``GET /v1/models``, ``GET /version``, ``GET /openapi.json`` (a minimal schema
    for feature detection), ``POST /tokenize``, ``POST /detokenize``, ``POST /v1/completions``.
vLLM reward (pooling runner)
    ``POST /classify`` (body with ``input`` / ``messages``), ``POST /pooling``.
SGLang native
    ``POST /generate``, ``POST /classify`` (body with ``text`` / ``input_ids``),
    ``GET /get_model_info`` (``/health`` is shared; ``/detokenize`` answers both layouts).
Toy extras
    ``GET /metrics``: JSON counters (requests by endpoint, faults, generated tokens...) and the
    wall-clock span of the model work it served (``first_request_at``, ``last_response_at``:
    the first work request's arrival and the last work answer, over tokenize, detokenize,
    generation and scoring), so a benchmark times every client alike, from the server.
    ``POST /admin/metrics/reset``: zero those counters between measurements.
    ``GET /admin/faults``, ``POST /admin/faults``: read or change the fault injection switches
    while the server runs (JSON with any of ``error_rate``, ``hang_rate``, ``hang_seconds``,
    ``malformed_rate``, ``nan_rate``, ``echo_auth``, ``seeded_errors``,
    ``seeded_error_every``); for chaos and secret-masking tests, and for runs that must meet
    the same faults in any order.
API key
    With ``api_key`` set, every endpoint but ``/health``, ``/metrics`` and ``/admin/faults``
    answers 401 ``{"error": "Unauthorized"}`` unless the request carries
    ``Authorization: Bearer <api_key>`` (vLLM's ``--api-key``).

Behaviour that matters for exactness, imitated from the real servers:

* A prompt's response so far is ``ToyModel.response_of(prompt_ids)``; new tokens follow the
  bigram chain from its last token. EOS (and any ``stop_token_ids`` hit) is the last entry of
  vLLM ``token_ids`` and of SGLang ``output_ids`` (SGLang's ``Req.output_ids_through_stop``
  "includes the stop position"; only the *text* is trimmed). ``finish_reason`` is ``"stop"``
  (vLLM ``stop_reason`` null for EOS, the int id for a ``stop_token_ids`` hit) or ``"length"``.
* Only neutral sampling settings are accepted (``top_p`` 1, ``top_k`` -1/0, ``min_p`` 0, neutral
  penalties, no stop strings / min_tokens / logit_bias...): anything else is a 400, because the
  target distribution would silently change. The one exception: ``stop`` strings that are
  special-token texts (such as the EOS text ``"</s>"`` that client-side tokenizing clients
  send), which the toy LM can never emit, so they change nothing.
* Temperature ``< 1e-5`` is greedy (argmax), like vLLM / SGLang.
* ``seed``: every sequence gets its own ``random.Random`` seeded from (seed + sample index within
  the prompt's ``n``, prompt ids) -- vLLM's rule (child k of ``n`` uses ``seed + k``; the same seed
  is applied to every prompt of a batch), so identical prompts with the same seed give identical
  samples, exactly as on a real server. Without a seed, fresh randomness.
* Logprobs are those of the distribution actually sampled from (temperature-scaled), i.e. vLLM's
  ``--logprobs-mode processed_logprobs``; ``logprobs_mode="raw_logprobs"`` reports temperature-1
  logprobs instead (vLLM V1's default).
* Errors: vLLM nested envelope ``{"error": {"message", "type", "param", "code"}}`` (400
  ``BadRequestError``, 404 ``NotFoundError``); SGLang native endpoints ``{"error": {"message"}}``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import json
import math
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from aiohttp import web

from qalign.toy.model import BOS, BYTE_BASE, END, EOS, SPECIALS, WORD_BASE, ToyModel

__all__ = [
    "LOGPROBS_MODES",
    "FaultSettings",
    "ToyServer",
    "ToyServerHandle",
    "ToyServerOptions",
    "create_app",
    "serve",
    "serve_in_thread",
]

VLLM_VERSION = "0.11.1"  # has return_token_ids (>= 0.10.2) and use_activation (>= ~0.11.1)
LEGACY_VLLM_VERSION = "0.10.1"  # nested error envelope, but no return_token_ids
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below it sampling is greedy
_MAX_TOKEN_ID = (1 << 63) - 1
_LOGPROB_FLOOR = -9999.0  # vLLM clamps -inf logprobs to this in its JSON

GENERATE_ENDPOINTS = ("/v1/completions", "/generate")
SCORE_ENDPOINTS = ("/classify", "/pooling")
ENDPOINTS = (
    "/health",
    "/v1/models",
    "/version",
    "/openapi.json",
    "/tokenize",
    "/detokenize",
    "/v1/completions",
    "/classify",
    "/pooling",
    "/generate",
    "/get_model_info",
    "/metrics",
    "/admin/faults",
    "/admin/metrics/reset",
)
FAULT_KINDS = ("error", "hang", "malformed", "nan", "seeded_error")


# ------------------------------------------------------------------------------------------------
# fault injection


@dataclass(frozen=True)
class FaultSettings:
    """Fault injection on /v1/completions, /generate, /classify, /pooling; all off by default.

    A request is answered 503 (`error_rate`) or first sleeps `hang_seconds` (`hang_rate`); a
    request that gets through has its 200 body cut short (`malformed_rate`: invalid JSON) or, on
    the scoring endpoints, every score replaced by NaN (`nan_rate`). `echo_auth` (any endpoint)
    makes every error answer quote the request's `Authorization` header, as some servers and
    proxies do: the clients must mask it (see `qalign.clients.redact`).

    `seeded_errors` > 0 makes faults a function of the request instead of a random draw: a
    generation whose `seed` is a multiple of `seeded_error_every` is answered 503 the first
    `seeded_errors` times that seed is asked for (counted from the last change of settings),
    so two runs that ask for the same generations meet the same faults in any order.
    """

    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 3600.0
    malformed_rate: float = 0.0
    nan_rate: float = 0.0
    echo_auth: bool = False
    seeded_errors: int = 0
    seeded_error_every: int = 1

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "echo_auth":
                if not isinstance(value, bool):
                    raise ValueError(f"echo_auth must be true or false, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        if self.hang_seconds < 0:
            raise ValueError("hang_seconds must be >= 0")
        for name in ("error_rate", "hang_rate", "malformed_rate", "nan_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if self.error_rate + self.hang_rate > 1.0:
            raise ValueError("error_rate + hang_rate must be <= 1")
        if self.seeded_errors < 0 or int(self.seeded_errors) != self.seeded_errors:
            raise ValueError("seeded_errors must be a whole number >= 0")
        if self.seeded_error_every < 1 or int(self.seeded_error_every) != self.seeded_error_every:
            raise ValueError("seeded_error_every must be a whole number >= 1")

    def updated(self, changes: Mapping[str, Any]) -> FaultSettings:
        """A copy with `changes` applied and checked; unknown keys raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault setting(s) {unknown}; known: {sorted(known)}")
        new = replace(self, **changes)
        new.check()
        return new


# ------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class ToyServerOptions:
    """Everything configurable about a toy server (also exposed as `qalign toy-server` flags)."""

    served_model_names: tuple[str, ...] = ("toy",)
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port
    max_model_len: int = 4096
    # latency model: each sequence takes latency_base + latency_per_token * generated tokens
    latency_base: float = 0.0
    latency_per_token: float = 0.0
    capacity: int = 0  # concurrent sequences; 0 = unlimited (beyond it requests wait)
    # fault injection on /v1/completions, /generate, /classify, /pooling (see FaultSettings);
    # these are the starting values, POST /admin/faults changes them at runtime
    error_rate: float = 0.0  # fraction answered 503
    hang_rate: float = 0.0  # fraction that sleep hang_seconds before answering
    hang_seconds: float = 3600.0
    malformed_rate: float = 0.0  # fraction whose 200 body is cut short (invalid JSON)
    nan_rate: float = 0.0  # fraction of scoring requests whose scores are all NaN
    echo_auth: bool = False  # error answers quote the request's Authorization header
    fault_seed: int | None = None
    # like vLLM's --api-key: requests without `Authorization: Bearer <api_key>` get 401
    api_key: str | None = field(default=None, repr=False)
    # emulation of older servers
    legacy_token_ids: bool = False  # pre-0.10.2 vLLM: return_token_ids ignored
    ignore_use_activation: bool = False  # old vLLM: /classify always applies the sigmoid
    logprobs_mode: str = "processed_logprobs"
    max_logprobs: int = 20  # vLLM --max-logprobs
    model: ToyModel = field(default_factory=ToyModel)

    def __post_init__(self) -> None:
        names = self.served_model_names
        if isinstance(names, str):
            object.__setattr__(self, "served_model_names", (names,))
        else:
            object.__setattr__(self, "served_model_names", tuple(names))
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served_model_names needs at least one non-empty name")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.latency_base < 0 or self.latency_per_token < 0 or self.hang_seconds < 0:
            raise ValueError("latencies and hang_seconds must be >= 0")
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0 (0 = unlimited)")
        self.faults().check()
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs must be >= 0")

    @property
    def version(self) -> str:
        return LEGACY_VLLM_VERSION if self.legacy_token_ids else VLLM_VERSION

    def faults(self) -> FaultSettings:
        """The starting fault injection settings."""
        return FaultSettings(
            error_rate=self.error_rate,
            hang_rate=self.hang_rate,
            hang_seconds=self.hang_seconds,
            malformed_rate=self.malformed_rate,
            nan_rate=self.nan_rate,
            echo_auth=self.echo_auth,
        )


# ------------------------------------------------------------------------------------------------
# errors


class _RequestError(Exception):
    """Turned into an HTTP error answer by the handler wrapper."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        err_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sglang = False  # answer with SGLang's native envelope
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or {
            400: "BadRequestError",
            404: "NotFoundError",
            503: "ServiceUnavailableError",
        }.get(status, "InternalServerError")


def _bad(message: str, param: str | None = None) -> _RequestError:
    return _RequestError(400, message, param=param)


def _vllm_error(err: _RequestError) -> web.Response:
    body = {
        "error": {
            "message": err.message,
            "type": err.err_type,
            "param": err.param,
            "code": err.status,
        }
    }
    return web.json_response(body, status=err.status)


def _sglang_error(err: _RequestError) -> web.Response:
    return web.json_response({"error": {"message": err.message}}, status=err.status)


# ------------------------------------------------------------------------------------------------
# sampling tables


@dataclass(frozen=True, slots=True)
class _Row:
    """p(next | one previous-token row) at one temperature, ready for fast sampling."""

    ids: tuple[int, ...]  # EOS then the word ids (same order in every row and temperature)
    cum: tuple[float, ...]  # cumulative probabilities, last forced to 1.0
    logps: tuple[float, ...]
    order: tuple[int, ...]  # indices by decreasing probability (ties: lower id first)


@dataclass(slots=True)
class _Sequence:
    tokens: list[int]
    logps: list[float]
    stop_token: int | None  # the EOS / stop id that ended it, None when it hit the length cap
    rows: list[int]  # table row each token was drawn from (for top logprobs)


class _Sampler:
    def __init__(self, model: ToyModel, logprobs_mode: str) -> None:
        self.model = model
        self.raw = logprobs_mode == "raw_logprobs"
        self.row_of = {w: i + 1 for i, w in enumerate(model.word_ids)}
        self._tables: dict[float, tuple[_Row, ...]] = {}

    def table(self, temperature: float) -> tuple[_Row, ...]:
        tab = self._tables.get(temperature)
        if tab is None:
            if len(self._tables) > 256:
                self._tables.clear()
            prevs: list[int | None] = [None, *self.model.word_ids]
            rows = []
            for prev in prevs:
                probs = self.model.next_probs(prev, temperature)
                ids = tuple(probs)
                ps = [probs[t] for t in ids]
                cum: list[float] = []
                acc = 0.0
                for p in ps:
                    acc += p
                    cum.append(acc)
                cum[-1] = 1.0
                logps = tuple(math.log(p) if p > 0 else -math.inf for p in ps)
                order = tuple(sorted(range(len(ids)), key=lambda j: (-ps[j], ids[j])))
                rows.append(_Row(ids, tuple(cum), logps, order))
            tab = tuple(rows)
            self._tables[temperature] = tab
        return tab

    def sample(
        self,
        prev: int | None,
        max_tokens: int,
        temperature: float,
        rng: random.Random,
        stop_ids: frozenset[int],
    ) -> _Sequence:
        greedy = temperature < _GREEDY_EPS
        tab = self.table(1.0 if greedy else temperature)
        lp_tab = self.table(1.0) if self.raw else tab
        row_of = self.row_of
        row = row_of.get(prev, 0) if prev is not None else 0
        tokens: list[int] = []
        logps: list[float] = []
        rows: list[int] = []
        uniform = rng.random
        for _ in range(max_tokens):
            r = tab[row]
            j = r.order[0] if greedy else bisect.bisect_right(r.cum, uniform())
            if j >= len(r.ids):  # guard against a rounding edge
                j = len(r.ids) - 1
            tok = r.ids[j]
            tokens.append(tok)
            logps.append(lp_tab[row].logps[j])
            rows.append(row)
            if tok in stop_ids:
                return _Sequence(tokens, logps, tok, rows)
            row = row_of.get(tok, 0)
        return _Sequence(tokens, logps, None, rows)

    def top(self, temperature: float, row: int, k: int) -> list[tuple[int, float]]:
        """The k most likely (token, logprob) of a row, in the reported logprobs mode."""
        greedy = temperature < _GREEDY_EPS
        r = self.table(1.0 if greedy or self.raw else temperature)[row]
        return [(r.ids[j], r.logps[j]) for j in r.order[:k]]


def _seeded_rng(seed: int, sample_index: int, prompt: Sequence[int]) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so this is stable across processes.
    return random.Random(f"{seed + sample_index}|{list(prompt)!r}")


# ------------------------------------------------------------------------------------------------
# request parsing helpers


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int_param(body: Mapping[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(f"{key} must be an integer, got {value!r}", key)
    if value < minimum:
        raise _bad(f"{key} must be at least {minimum}, got {value}.", key)
    return int(value)


def _float_param(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise _bad(f"{key} must be a finite number, got {value!r}", key)
    return float(value)


def _bool_param(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{key} must be a boolean, got {value!r}", key)
    return value


def _neutral(value: Any, allowed: tuple[float, ...]) -> bool:
    return value is None or (_is_number(value) and float(value) in allowed)


_NEUTRAL_CHECKS: tuple[tuple[str, tuple[float, ...], str], ...] = (
    ("top_p", (1.0,), "top_p must be 1"),
    ("top_k", (-1.0, 0.0), "top_k must be -1 or 0 (disabled)"),
    ("min_p", (0.0,), "min_p must be 0"),
    ("repetition_penalty", (1.0,), "repetition_penalty must be 1"),
    ("presence_penalty", (0.0,), "presence_penalty must be 0"),
    ("frequency_penalty", (0.0,), "frequency_penalty must be 0"),
    ("min_tokens", (0.0,), "min_tokens must be 0"),
    ("min_new_tokens", (0.0,), "min_new_tokens must be 0"),
)
_MUST_BE_EMPTY = (
    "stop",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "response_format",
    "json_schema",
    "regex",
    "ebnf",
)
_MUST_BE_FALSE = ("stream", "echo", "use_beam_search")


def _inert_stop(params: Mapping[str, Any]) -> bool:
    """Whether `stop` holds only special-token texts that cannot end a toy sequence early.

    Clients that tokenize client-side (the paper authors' package) pass the tokenizer's EOS text
    as a stop string. The toy LM samples only words and EOS, and EOS already stops it, so a
    special token's text can never appear in generated text: such a `stop` changes nothing.
    With ignore_eos the EOS text could be emitted, so there it is still refused.
    """
    stop = params.get("stop")
    strings = [stop] if isinstance(stop, str) else stop
    return (
        isinstance(strings, list)
        and all(isinstance(x, str) and x in _SPECIAL_TEXTS for x in strings)
        and not params.get("ignore_eos")
    )


_SPECIAL_TEXTS = frozenset(SPECIALS.values())


def _check_neutral(params: Mapping[str, Any]) -> None:
    """Reject every setting that would make the served distribution differ from the toy LM."""
    for key, allowed, what in _NEUTRAL_CHECKS:
        if not _neutral(params.get(key), allowed):
            raise _bad(
                f"the toy server only supports neutral sampling settings ({what}, got "
                f"{params.get(key)!r}): anything else would silently change the exact target",
                key,
            )
    for key in _MUST_BE_EMPTY:
        if key == "stop" and _inert_stop(params):
            continue
        if params.get(key) not in (None, "", [], {}):
            raise _bad(f"the toy server does not support {key!r}", key)
    for key in _MUST_BE_FALSE:
        if params.get(key):
            raise _bad(f"the toy server does not support {key}=true", key)


# ------------------------------------------------------------------------------------------------
# state shared by the handlers


class _Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = dict.fromkeys(ENDPOINTS, 0)
        self.faults = dict.fromkeys(FAULT_KINDS, 0)
        self.status = {"400": 0, "401": 0, "404": 0, "503": 0}
        self.generated_tokens = 0
        self.sequences = 0
        self.scored_inputs = 0
        self.running_sequences = 0
        self.peak_running_sequences = 0
        self.temperatures: dict[str, int] = {}  # sequences sampled at each temperature
        # chat_template_kwargs seen by /tokenize, as sorted JSON -> count (the toy template
        # ignores them; tests check that a client sends them)
        self.template_kwargs: dict[str, int] = {}
        self.prompt_logprob_tokens = 0
        # scoring requests answered with the sigmoid applied: a client's startup probe of
        # use_activation sends one, so tests can tell probes from scoring
        self.activated_requests = 0
        self.first_request_at: float | None = None  # time.time() of the first work request
        self.last_response_at: float | None = None  # ... and of the last work answer

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "errors_by_status": dict(self.status),
            "generated_tokens": self.generated_tokens,
            "sequences": self.sequences,
            "scored_inputs": self.scored_inputs,
            "running_sequences": self.running_sequences,
            "peak_running_sequences": self.peak_running_sequences,
            "temperatures": dict(self.temperatures),
            "template_kwargs": dict(self.template_kwargs),
            "prompt_logprob_tokens": self.prompt_logprob_tokens,
            "activated_requests": self.activated_requests,
            "first_request_at": self.first_request_at,
            "last_response_at": self.last_response_at,
        }


_STATE: web.AppKey[_ToyState] = web.AppKey("qalign_toy_state")


class _ToyState:
    def __init__(self, options: ToyServerOptions) -> None:
        self.options = options
        self.model = options.model
        self.served = options.served_model_names
        self.sampler = _Sampler(options.model, options.logprobs_mode)
        self.stats = _Stats()
        self.faults = options.faults()  # replaced whole by POST /admin/faults
        self.seed_requests: dict[int, int] = {}  # requests per generation seed (seeded_errors)
        self.fault_rng = random.Random(options.fault_seed)
        self.rng = random.Random()  # unseeded requests: fresh randomness
        self.capacity: asyncio.Semaphore | None = None  # created on the serving loop
        self.stopping: asyncio.Event | None = None
        self.vocab_size = options.model.vocab_size
        self.token_strs = {
            t: options.model.decode([t]) for t in (*SPECIALS, *options.model.word_ids)
        }
        self.reward_cache: dict[tuple[int, ...], float] = {}

    # ---- small helpers -----------------------------------------------------------------------
    def model_name(self, body: Mapping[str, Any]) -> str:
        name = body.get("model")
        if name is None or name == "":
            return self.served[0]
        if name not in self.served:
            raise _RequestError(404, f"The model `{name}` does not exist.")
        return str(name)

    def check_ids(self, ids: Any, param: str) -> list[int]:
        if not isinstance(ids, list):
            raise _bad(f"{param} must be a list of token ids", param)
        vocab = self.vocab_size
        for t in ids:
            if not _is_int(t):
                raise _bad(f"{param} must contain integer token ids, got {t!r}", param)
            if t < WORD_BASE:
                if t not in SPECIALS:
                    raise _bad(f"Token id {t} is out of vocabulary", param)
            elif vocab <= t < BYTE_BASE or t > _MAX_TOKEN_ID:
                raise _bad(f"Token id {t} is out of vocabulary", param)
        return ids

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.model.encode(text)
        return [BOS, *ids] if add_special_tokens else ids

    def token_str(self, t: int, as_id: bool) -> str:
        if as_id:
            return f"token_id:{t}"
        s = self.token_strs.get(t)
        return s if s is not None else self.model.decode([t])

    def reward(self, ids: Sequence[int]) -> float:
        resp = tuple(self.model.response_of(ids))
        value = self.reward_cache.get(resp)
        if value is None:
            value = self.model.reward(resp)
            if len(self.reward_cache) > 100_000:
                self.reward_cache.clear()
            self.reward_cache[resp] = value
        return value

    # ---- faults, capacity and latency ---------------------------------------------------------
    async def maybe_fault(self) -> None:
        opts = self.faults
        if opts.error_rate <= 0 and opts.hang_rate <= 0:
            return
        u = self.fault_rng.random()
        if u < opts.error_rate:
            self.stats.faults["error"] += 1
            raise _RequestError(503, "injected fault: the server is temporarily unavailable")
        if u < opts.error_rate + opts.hang_rate:
            self.stats.faults["hang"] += 1
            assert self.stopping is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), opts.hang_seconds)
            if self.stopping.is_set():
                raise _RequestError(503, "the server is shutting down")

    def maybe_seeded_fault(self, seed: int | None) -> None:
        """503 for the first `seeded_errors` requests of an unlucky seed (see FaultSettings)."""
        opts = self.faults
        if opts.seeded_errors <= 0 or seed is None or seed % opts.seeded_error_every:
            return
        seen = self.seed_requests.get(seed, 0)
        self.seed_requests[seed] = seen + 1
        if seen < opts.seeded_errors:
            self.stats.faults["seeded_error"] += 1
            raise _RequestError(
                503, f"injected fault: seed {seed} fails its first {opts.seeded_errors} request(s)"
            )

    def draw(self, kind: str, rate: float) -> bool:
        """Whether this request gets fault `kind`; counts it. No draw at rate 0 (keeps seeded
        fault sequences of the other kinds unchanged)."""
        if rate <= 0 or self.fault_rng.random() >= rate:
            return False
        self.stats.faults[kind] += 1
        return True

    async def run_sequences(
        self, jobs: Sequence[Callable[[], Any]], tokens_of: Callable[[Any], int]
    ) -> list[Any]:
        """Run `jobs` (one per sequence) under the capacity limit and the latency model."""
        opts = self.options
        if self.capacity is None and opts.latency_base <= 0 and opts.latency_per_token <= 0:
            stats = self.stats
            stats.running_sequences += len(jobs)
            stats.peak_running_sequences = max(
                stats.peak_running_sequences, stats.running_sequences
            )
            try:
                return [job() for job in jobs]
            finally:
                stats.running_sequences -= len(jobs)
        if len(jobs) == 1:
            return [await self._one(jobs[0], tokens_of)]
        return list(await asyncio.gather(*(self._one(job, tokens_of) for job in jobs)))

    async def _one(self, job: Callable[[], Any], tokens_of: Callable[[Any], int]) -> Any:
        sem = self.capacity
        if sem is not None:
            await sem.acquire()
        stats = self.stats
        stats.running_sequences += 1
        stats.peak_running_sequences = max(stats.peak_running_sequences, stats.running_sequences)
        try:
            result = job()
            delay = self.options.latency_base + self.options.latency_per_token * tokens_of(result)
            if delay > 0:
                await asyncio.sleep(delay)
            return result
        finally:
            stats.running_sequences -= 1
            if sem is not None:
                sem.release()

    # ---- generation ----------------------------------------------------------------------------
    def generate_one(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        sample_index: int,
        stop_ids: frozenset[int],
    ) -> _Sequence:
        response = self.model.response_of(prompt)
        prev = response[-1] if response else None
        rng = self.rng if seed is None else _seeded_rng(seed, sample_index, prompt)
        seq = self.sampler.sample(prev, max_tokens, temperature, rng, stop_ids)
        self.stats.generated_tokens += len(seq.tokens)
        self.stats.sequences += 1
        key = f"{temperature:g}"
        self.stats.temperatures[key] = self.stats.temperatures.get(key, 0) + 1
        return seq

    def text_of(self, seq: _Sequence, skip_special: bool, keep_stop: bool) -> str:
        ids = seq.tokens
        if seq.stop_token is not None and not keep_stop:
            ids = ids[:-1]
        if not ids:
            return ""
        return self.model.decode(ids, skip_special=skip_special)


# ------------------------------------------------------------------------------------------------
# handlers


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_FAULTY_ENDPOINTS = frozenset((*GENERATE_ENDPOINTS, *SCORE_ENDPOINTS))
_OPEN_ENDPOINTS = frozenset(("/health", "/metrics", "/admin/faults", "/admin/metrics/reset"))
# the endpoints whose requests are model work (the activity span in /metrics)
_WORK_ENDPOINTS = frozenset(
    ("/tokenize", "/detokenize", "/v1/completions", "/classify", "/pooling", "/generate")
)


def _malformed(resp: web.Response) -> web.Response:
    """The same answer with its JSON body cut in half, as a crashing proxy might send it."""
    body = resp.body if isinstance(resp.body, bytes) else b"{}"
    return web.Response(status=200, body=body[: len(body) // 2], content_type="application/json")


def _handler(state: _ToyState, endpoint: str, fn: _Handler, *, sglang: bool = False) -> _Handler:
    stats = state.stats
    faulty = endpoint in _FAULTY_ENDPOINTS
    key = state.options.api_key
    expected = None if key is None or endpoint in _OPEN_ENDPOINTS else f"Bearer {key}".encode()

    work = endpoint in _WORK_ENDPOINTS

    async def handle(request: web.Request) -> web.StreamResponse:
        stats.requests[endpoint] += 1
        if work and stats.first_request_at is None:
            stats.first_request_at = time.time()
        auth = request.headers.get("Authorization")
        try:
            return await _answer(request, auth)
        finally:
            if work:
                stats.last_response_at = time.time()

    async def _answer(request: web.Request, auth: str | None) -> web.StreamResponse:
        try:
            if expected is not None and not hmac.compare_digest((auth or "").encode(), expected):
                raise _RequestError(401, "Unauthorized")
            resp = await fn(request)
            if (
                faulty
                and resp.status == 200
                and isinstance(resp, web.Response)
                and state.draw("malformed", state.faults.malformed_rate)
            ):
                return _malformed(resp)
            return resp
        except _RequestError as err:
            code = str(err.status)
            stats.status[code] = stats.status.get(code, 0) + 1
            if state.faults.echo_auth:
                err.message += f" (request Authorization: {auth or '(none)'})"
            if err.status == 401:  # vLLM's --api-key answer
                return web.json_response({"error": err.message}, status=401)
            return _sglang_error(err) if sglang or err.sglang else _vllm_error(err)

    return handle


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _now() -> int:
    return int(time.time())


class _Handlers:
    def __init__(self, state: _ToyState) -> None:
        self.s = state

    # ---- simple GETs ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        created = _now()
        data: list[dict[str, Any]] = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "qalign-toy",
                "root": name,
                "parent": None,
                "max_model_len": self.s.options.max_model_len,
                "permission": [],
            }
            for name in self.s.served
        ]
        return web.json_response({"object": "list", "data": data})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.s.options.version})

    async def openapi(self, request: web.Request) -> web.Response:
        opts = self.s.options
        completion = [
            "model", "prompt", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p",
            "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
            "stop_token_ids", "ignore_eos", "logprobs", "return_tokens_as_token_ids",
            "skip_special_tokens", "include_stop_str_in_output",
        ]  # fmt: skip
        if not opts.legacy_token_ids:
            completion.append("return_token_ids")
        classify = ["model", "input", "messages", "add_special_tokens"]
        if not opts.ignore_use_activation:
            classify.append("use_activation")
        schemas: dict[str, Any] = {
            "CompletionRequest": {"properties": {k: {} for k in completion}},
            "ClassificationCompletionRequest": {"properties": {k: {} for k in classify}},
        }
        routes = ("/health", "/v1/models", "/version", "/tokenize", "/detokenize", "/pooling")
        paths: dict[str, Any] = {p: {} for p in (*routes, "/v1/completions", "/classify")}
        body = {
            "openapi": "3.1.0",
            "info": {"title": "qalign toy server", "version": opts.version},
            "paths": paths,
            "components": {"schemas": schemas},
        }
        return web.json_response(body)

    async def get_model_info(self, request: web.Request) -> web.Response:
        name = self.s.served[0]
        return web.json_response(
            {
                "model_path": name,
                "tokenizer_path": name,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response(self.s.stats.snapshot())

    def _faults_body(self) -> dict[str, Any]:
        return {"faults": asdict(self.s.faults), "injected": dict(self.s.stats.faults)}

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._faults_body())

    async def reset_metrics(self, request: web.Request) -> web.Response:
        running = self.s.stats.running_sequences  # a gauge, not a counter: keep it true
        self.s.stats.reset()
        self.s.stats.running_sequences = running
        return web.json_response(self.s.stats.snapshot())

    async def set_faults(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            self.s.faults = self.s.faults.updated(body)
        except (ValueError, TypeError) as exc:
            raise _bad(str(exc)) from None
        self.s.seed_requests.clear()
        return web.json_response(self._faults_body())

    # ---- tokenizer -----------------------------------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        s = self.s
        body = await _json_body(request)
        s.model_name(body)
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise _bad("messages must be a list", "messages")
            kwargs = body.get("chat_template_kwargs")
            if kwargs is not None:
                if not isinstance(kwargs, dict):
                    raise _bad("chat_template_kwargs must be an object", "chat_template_kwargs")
                key = json.dumps(kwargs, sort_keys=True)
                s.stats.template_kwargs[key] = s.stats.template_kwargs.get(key, 0) + 1
            add_gen = _bool_param(body, "add_generation_prompt", True)
            cont = _bool_param(body, "continue_final_message", False)
            if add_gen and cont:
                raise _bad(
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                )
            try:
                ids = s.model.chat_ids(messages, add_generation_prompt=add_gen)
            except (ValueError, AttributeError, TypeError) as exc:
                raise _bad(str(exc), "messages") from None
            if cont:
                if not messages or messages[-1].get("role") != "assistant":
                    raise _bad("continue_final_message needs a final assistant message")
                if ids and ids[-1] == END:
                    ids = ids[:-1]
            if _bool_param(body, "add_special_tokens", False):
                ids = [BOS, *ids]
        elif "prompt" in body:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise _bad("prompt must be a string", "prompt")
            ids = s.encode(prompt, _bool_param(body, "add_special_tokens", True))
        else:
            raise _bad("either `prompt` or `messages` is required")
        strs = None
        if _bool_param(body, "return_token_strs", False):
            strs = [s.token_str(t, False) for t in ids]
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": s.options.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        s = self.s
        body = await _json_body(request)
        s.model_name(body)
        ids = s.check_ids(body.get("tokens"), "tokens")
        try:
            text = s.model.decode(ids)
        except ValueError as exc:
            raise _bad(str(exc), "tokens") from None
        # vLLM answers {"prompt": ...}, SGLang {"text": ...}: one path serves both clients.
        return web.json_response({"prompt": text, "text": text})

    # ---- vLLM completions ----------------------------------------------------------------------
    def _vllm_prompts(self, prompt: Any, add_special_tokens: bool) -> list[list[int]]:
        s = self.s
        if isinstance(prompt, str):
            return [s.encode(prompt, add_special_tokens)]
        if not isinstance(prompt, list) or not prompt:
            raise _bad("Prompt cannot be empty" if prompt == [] else "invalid prompt", "prompt")
        first = prompt[0]
        if _is_int(first):
            return [s.check_ids(prompt, "prompt")]
        if isinstance(first, str):
            if not all(isinstance(p, str) for p in prompt):
                raise _bad("prompt must not mix strings and token ids", "prompt")
            return [s.encode(p, add_special_tokens) for p in prompt]
        if isinstance(first, list):
            out = []
            for p in prompt:
                if not isinstance(p, list) or not p:
                    raise _bad("Prompt cannot be empty", "prompt")
                out.append(s.check_ids(p, "prompt"))
            return out
        raise _bad("prompt must be a string, a list of token ids, or a list of either", "prompt")

    async def completions(self, request: web.Request) -> web.Response:
        s = self.s
        opts = s.options
        body = await _json_body(request)
        await s.maybe_fault()
        model = s.model_name(body)
        _check_neutral(body)
        max_tokens = _int_param(body, "max_tokens", 16, 1)
        assert max_tokens is not None
        n = _int_param(body, "n", 1, 1)
        assert n is not None
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise _bad("the toy server does not support best_of != n", "best_of")
        temperature = _float_param(body, "temperature", 1.0)
        if temperature < 0:
            raise _bad(f"temperature must be non-negative, got {temperature}.", "temperature")
        seed = _int_param(body, "seed", None, -(1 << 63))
        s.maybe_seeded_fault(seed)
        logprobs = _int_param(body, "logprobs", None, 0)
        if logprobs is not None and logprobs > opts.max_logprobs:
            raise _bad(
                f"Requested sample logprobs of {logprobs}, which is greater than max allowed: "
                f"{opts.max_logprobs}",
                "logprobs",
            )
        prompt_logprobs = _int_param(body, "prompt_logprobs", None, 0)
        if prompt_logprobs is not None and prompt_logprobs > opts.max_logprobs:
            raise _bad(
                f"Requested prompt logprobs of {prompt_logprobs}, which is greater than max "
                f"allowed: {opts.max_logprobs}",
                "prompt_logprobs",
            )
        as_ids = _bool_param(body, "return_tokens_as_token_ids", False)
        return_ids = _bool_param(body, "return_token_ids", False) and not opts.legacy_token_ids
        skip_special = _bool_param(body, "skip_special_tokens", True)
        keep_stop = _bool_param(body, "include_stop_str_in_output", False)
        ignore_eos = _bool_param(body, "ignore_eos", False)
        stop_token_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_token_ids, list) or not all(_is_int(t) for t in stop_token_ids):
            raise _bad("stop_token_ids must be a list of integers", "stop_token_ids")
        stop_ids = frozenset(stop_token_ids) | (frozenset() if ignore_eos else frozenset((EOS,)))
        prompts = self._vllm_prompts(
            body.get("prompt"), _bool_param(body, "add_special_tokens", True)
        )
        limit = opts.max_model_len
        for p in prompts:
            if len(p) + max_tokens > limit:
                if len(p) >= limit:
                    msg = (
                        f"This model's maximum context length is {limit} tokens. However, your "
                        f"request has {len(p)} input tokens. Please reduce the length of the "
                        "input messages."
                    )
                else:
                    msg = (
                        f"'max_tokens' is too large: {max_tokens}. This model's maximum context "
                        f"length is {limit} tokens and your request has {len(p)} input tokens "
                        f"({max_tokens} > {limit} - {len(p)})."
                    )
                raise _bad(msg, "max_tokens" if len(p) < limit else "prompt")

        jobs = []
        for p in prompts:
            for k in range(n):
                jobs.append(
                    lambda p=p, k=k: s.generate_one(
                        p,
                        max_tokens=max_tokens,
                        temperature=temperature,
                        seed=seed,
                        sample_index=k,
                        stop_ids=stop_ids,
                    )
                )
        seqs: list[_Sequence] = await s.run_sequences(jobs, lambda q: len(q.tokens))

        choices = []
        completion_tokens = 0
        for i, seq in enumerate(seqs):
            prompt = prompts[i // n]
            completion_tokens += len(seq.tokens)
            if seq.stop_token is None:
                finish, stop_reason = "length", None
            else:
                finish = "stop"
                stop_reason = None if seq.stop_token == EOS and not ignore_eos else seq.stop_token
            choice: dict[str, Any] = {
                "index": i,
                "text": s.text_of(seq, skip_special, keep_stop),
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "token_ids": list(seq.tokens) if return_ids else None,
                "prompt_token_ids": list(prompt) if return_ids else None,
                "prompt_logprobs": None,
            }
            if prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(prompt, prompt_logprobs)
            if logprobs is not None:
                choice["logprobs"] = self._vllm_logprobs(seq, logprobs, as_ids, temperature)
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts)
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": _now(),
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": None,
                },
            }
        )

    def _prompt_logprobs(self, prompt: Sequence[int], k: int) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: null, then per token its own entry plus the top k."""
        s = self.s
        s.stats.prompt_logprob_tokens += len(prompt)
        out: list[dict[str, Any] | None] = []
        for i, (tok, lp) in enumerate(zip(prompt, s.model.prompt_logprobs(prompt), strict=True)):
            if i == 0 or lp is None:
                out.append(None)
                continue
            entry = {str(tok): {"logprob": lp, "rank": 1, "decoded_token": s.token_str(tok, False)}}
            out.append(entry)
        del k  # the toy's prompt entries hold only the prompt token (k alternatives not listed)
        return out

    def _vllm_logprobs(
        self, seq: _Sequence, k: int, as_ids: bool, temperature: float
    ) -> dict[str, Any]:
        s = self.s
        tokens = [s.token_str(t, as_ids) for t in seq.tokens]
        token_logprobs = [max(lp, _LOGPROB_FLOOR) for lp in seq.logps]
        top: list[dict[str, float]] = []
        for t, lp, row in zip(seq.tokens, token_logprobs, seq.rows, strict=True):
            entry = {s.token_str(t, as_ids): lp}  # the sampled token first, then the top k
            for tid, tlp in s.sampler.top(temperature, row, k):
                entry.setdefault(s.token_str(tid, as_ids), max(tlp, _LOGPROB_FLOOR))
            top.append(entry)
        offsets = []
        pos = 0
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        return {
            "text_offset": offsets,
            "token_logprobs": token_logprobs,
            "tokens": tokens,
            "top_logprobs": top,
        }

    # ---- vLLM pooling ----------------------------------------------------------------------------
    def _pooling_inputs(self, body: Mapping[str, Any]) -> list[list[int]]:
        s = self.s
        add_special = _bool_param(body, "add_special_tokens", "messages" not in body)
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise _bad("messages must be a list", "messages")
            try:
                ids = s.model.chat_ids(messages, _bool_param(body, "add_generation_prompt", False))
            except (ValueError, AttributeError, TypeError) as exc:
                raise _bad(str(exc), "messages") from None
            inputs = [[BOS, *ids] if add_special else ids]
        else:
            inp = body.get("input")
            if isinstance(inp, str):
                inputs = [s.encode(inp, add_special)]
            elif isinstance(inp, list) and inp:
                first = inp[0]
                if _is_int(first):
                    inputs = [s.check_ids(inp, "input")]
                elif isinstance(first, str):
                    if not all(isinstance(x, str) for x in inp):
                        raise _bad("input must not mix strings and token ids", "input")
                    inputs = [s.encode(x, add_special) for x in inp]
                elif isinstance(first, list):
                    inputs = [s.check_ids(x, "input") for x in inp]
                else:
                    raise _bad("invalid input", "input")
            else:
                raise _bad("input cannot be empty", "input")
        limit = s.options.max_model_len
        for ids in inputs:
            if not ids:
                raise _bad("input cannot be empty", "input")
            if len(ids) > limit:
                raise _bad(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {len(ids)} tokens in the input for classification. Please "
                    "reduce the length of the input.",
                    "input",
                )
        return inputs

    async def _score(self, inputs: list[list[int]]) -> list[float]:
        s = self.s
        jobs = [lambda ids=ids: s.reward(ids) for ids in inputs]
        scores = await s.run_sequences(jobs, lambda _: 0)
        s.stats.scored_inputs += len(inputs)
        if s.draw("nan", s.faults.nan_rate):
            return [math.nan] * len(scores)
        return scores

    @staticmethod
    def _usage(inputs: list[list[int]]) -> dict[str, Any]:
        n = sum(len(x) for x in inputs)
        return {
            "prompt_tokens": n,
            "total_tokens": n,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }

    async def classify(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if (
            "input" not in body
            and "messages" not in body
            and ("text" in body or "input_ids" in body)
        ):
            try:
                return await self._sglang_classify(body)
            except _RequestError as err:
                err.sglang = True
                raise
        s = self.s
        await s.maybe_fault()
        model = s.model_name(body)
        if "input" not in body and "messages" not in body:
            raise _bad("either `input` or `messages` is required", "input")
        use_act = body.get("use_activation")
        if use_act is None:
            use_act = body.get("activation")  # vLLM 0.10.x name, deprecated later
        if use_act is not None and not isinstance(use_act, bool):
            raise _bad("use_activation must be a boolean", "use_activation")
        if s.options.ignore_use_activation or use_act is None:
            use_act = True
        if body.get("use_activation", body.get("activation")) is True:
            s.stats.activated_requests += 1
        if body.get("normalize") is not None or body.get("softmax") is not None:
            raise _bad("`normalize` / `softmax` were removed; use `use_activation`")
        inputs = self._pooling_inputs(body)
        scores = await self._score(inputs)
        data = [
            {
                "index": i,
                "label": "LABEL_0",
                "probs": [_sigmoid(x) if use_act else x],
                "num_classes": 1,
            }
            for i, x in enumerate(scores)
        ]
        return web.json_response(
            {
                "id": f"classify-{uuid.uuid4().hex}",
                "object": "list",
                "created": _now(),
                "model": model,
                "data": data,
                "usage": self._usage(inputs),
            }
        )

    async def pooling(self, request: web.Request) -> web.Response:
        s = self.s
        body = await _json_body(request)
        await s.maybe_fault()
        model = s.model_name(body)
        if "input" not in body and "messages" not in body:
            raise _bad("either `input` or `messages` is required", "input")
        inputs = self._pooling_inputs(body)
        scores = await self._score(inputs)
        data = [{"index": i, "object": "pooling", "data": [x]} for i, x in enumerate(scores)]
        return web.json_response(
            {
                "id": f"pool-{uuid.uuid4().hex}",
                "object": "list",
                "created": _now(),
                "model": model,
                "data": data,
                "usage": self._usage(inputs),
            }
        )

    # ---- SGLang native ---------------------------------------------------------------------------
    def _sglang_inputs(self, body: Mapping[str, Any]) -> tuple[list[list[int]], bool]:
        """(inputs, is_single) from `text` | `input_ids`, as SGLang's GenerateReqInput."""
        s = self.s
        has_text = body.get("text") is not None
        has_ids = body.get("input_ids") is not None
        if has_text == has_ids:
            raise _bad("Either text or input_ids should be provided (exactly one).")
        if has_text:
            text = body["text"]
            if isinstance(text, str):
                return [s.encode(text, True)], True
            if isinstance(text, list) and text and all(isinstance(x, str) for x in text):
                return [s.encode(x, True) for x in text], False
            raise _bad("text must be a string or a non-empty list of strings")
        ids = body["input_ids"]
        if isinstance(ids, list) and ids and _is_int(ids[0]):
            return [s.check_ids(ids, "input_ids")], True
        if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            out = []
            for x in ids:
                if not x:
                    raise _bad("input_ids must not be empty")
                out.append(s.check_ids(x, "input_ids"))
            return out, False
        raise _bad("input_ids must be a non-empty list of ints or of lists of ints")

    @staticmethod
    def _per_item(value: Any, count: int, name: str, default: Any) -> list[Any]:
        if value is None:
            return [default] * count
        if isinstance(value, list):
            if len(value) != count:
                raise _bad(f"{name} has {len(value)} entries for {count} inputs")
            return [default if v is None else v for v in value]
        return [value] * count

    async def generate(self, request: web.Request) -> web.Response:
        s = self.s
        limit = s.options.max_model_len
        body = await _json_body(request)
        await s.maybe_fault()
        if body.get("stream"):
            raise _bad("the toy server does not support stream=true")
        inputs, single = self._sglang_inputs(body)
        count = len(inputs)
        params_list = self._per_item(body.get("sampling_params"), count, "sampling_params", {})
        return_lp = self._per_item(body.get("return_logprob"), count, "return_logprob", False)
        top_nums = self._per_item(body.get("top_logprobs_num"), count, "top_logprobs_num", 0)
        rids = self._per_item(body.get("rid"), count, "rid", None)

        plans = []  # (input index, params, sample index, rid)
        for i, (ids, params) in enumerate(zip(inputs, params_list, strict=True)):
            if not isinstance(params, dict):
                raise _bad("sampling_params must be an object")
            _check_neutral(params)
            max_new = _int_param(params, "max_new_tokens", 128, 0)
            assert max_new is not None
            if len(ids) >= limit:
                raise _bad(
                    f"The input ({len(ids)} tokens) is longer than the model's context length "
                    f"({limit} tokens)."
                )
            if len(ids) + max_new > limit:
                raise _bad(
                    f"Requested token count exceeds the model's maximum context length of "
                    f"{limit} tokens. You requested a total of {len(ids) + max_new} tokens: "
                    f"{len(ids)} tokens from the input messages and {max_new} tokens for the "
                    "completion. Please reduce the number of tokens in the input messages or "
                    "the completion to fit within the limit."
                )
            temperature = _float_param(params, "temperature", 1.0)
            if temperature < 0:
                raise _bad("temperature must be non-negative")
            seed = params.get("sampling_seed", params.get("seed"))
            if seed is not None and not _is_int(seed):
                raise _bad("sampling_seed must be an integer")
            n = _int_param(params, "n", 1, 1)
            assert n is not None
            stop_token_ids = params.get("stop_token_ids") or []
            if not isinstance(stop_token_ids, list) or not all(_is_int(t) for t in stop_token_ids):
                raise _bad("stop_token_ids must be a list of integers")
            ignore_eos = _bool_param(params, "ignore_eos", False)
            stop_ids = frozenset(stop_token_ids) | (
                frozenset() if ignore_eos else frozenset((EOS,))
            )
            lp = return_lp[i]
            if not isinstance(lp, bool):
                raise _bad("return_logprob must be a boolean")
            top_num = top_nums[i]
            if not _is_int(top_num) or top_num < 0:
                raise _bad("top_logprobs_num must be a non-negative integer")
            rid = rids[i]
            for k in range(n):
                item_rid = str(rid) if n == 1 else f"{rid}-{k}"
                if rid is None:
                    item_rid = uuid.uuid4().hex
                plans.append(
                    {
                        "ids": ids,
                        "max_new": max_new,
                        "temperature": temperature,
                        "seed": seed,
                        "k": k,
                        "stop_ids": stop_ids,
                        "skip_special": _bool_param(params, "skip_special_tokens", True),
                        "no_stop_trim": _bool_param(params, "no_stop_trim", False),
                        "return_logprob": lp,
                        "top_num": top_num,
                        "rid": item_rid,
                    }
                )
            if n > 1:
                single = False
        start = time.perf_counter()
        jobs = [
            lambda pl=pl: s.generate_one(
                pl["ids"],
                max_tokens=pl["max_new"],
                temperature=pl["temperature"],
                seed=pl["seed"],
                sample_index=pl["k"],
                stop_ids=pl["stop_ids"],
            )
            for pl in plans
        ]
        seqs: list[_Sequence] = await s.run_sequences(jobs, lambda q: len(q.tokens))
        latency = time.perf_counter() - start
        out = []
        for pl, seq in zip(plans, seqs, strict=True):
            if seq.stop_token is None:
                finish: dict[str, Any] = {"type": "length", "length": pl["max_new"]}
            else:
                finish = {"type": "stop", "matched": seq.stop_token}
            meta: dict[str, Any] = {
                "id": pl["rid"],
                "finish_reason": finish,
                "prompt_tokens": len(pl["ids"]),
                "completion_tokens": len(seq.tokens),
                "cached_tokens": 0,
                "e2e_latency": latency,
            }
            if pl["return_logprob"]:
                meta["input_token_logprobs"] = []
                meta["output_token_logprobs"] = [
                    [lp, t, None] for lp, t in zip(seq.logps, seq.tokens, strict=True)
                ]
                if pl["top_num"] > 0:
                    meta["input_top_logprobs"] = []
                    top = s.sampler.top
                    temp, num = pl["temperature"], pl["top_num"]
                    meta["output_top_logprobs"] = [
                        [[tlp, tid, None] for tid, tlp in top(temp, row, num)] for row in seq.rows
                    ]
            out.append(
                {
                    "text": s.text_of(seq, pl["skip_special"], pl["no_stop_trim"]),
                    "output_ids": list(seq.tokens),
                    "meta_info": meta,
                }
            )
        return web.json_response(out[0] if single else out)

    async def _sglang_classify(self, body: Mapping[str, Any]) -> web.Response:
        s = self.s
        await s.maybe_fault()
        inputs, single = self._sglang_inputs(body)
        limit = s.options.max_model_len
        for ids in inputs:
            if len(ids) > limit:
                raise _bad(
                    f"The input ({len(ids)} tokens) is longer than the model's context length "
                    f"({limit} tokens)."
                )
        rids = self._per_item(body.get("rid"), len(inputs), "rid", None)
        start = time.perf_counter()
        scores = await self._score(inputs)
        latency = time.perf_counter() - start
        out = [
            {
                "embedding": [x],
                "meta_info": {
                    "id": uuid.uuid4().hex if rid is None else str(rid),
                    "finish_reason": {"type": "length", "length": 0},
                    "prompt_tokens": len(ids),
                    "cached_tokens": 0,
                    "e2e_latency": latency,
                },
            }
            for ids, x, rid in zip(inputs, scores, rids, strict=True)
        ]
        return web.json_response(out[0] if single else out)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


# ------------------------------------------------------------------------------------------------
# app and servers


def create_app(options: ToyServerOptions | None = None) -> web.Application:
    """The aiohttp application (all endpoints); `options.host/port` are not used here."""
    options = options or ToyServerOptions()
    state = _ToyState(options)
    h = _Handlers(state)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_STATE] = state

    async def on_startup(app: web.Application) -> None:
        st = app[_STATE]
        st.stopping = asyncio.Event()
        st.capacity = asyncio.Semaphore(options.capacity) if options.capacity > 0 else None

    async def on_shutdown(app: web.Application) -> None:
        stopping = app[_STATE].stopping
        if stopping is not None:
            stopping.set()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)

    def wrap(endpoint: str, fn: _Handler, sglang: bool = False) -> _Handler:
        return _handler(state, endpoint, fn, sglang=sglang)

    r = app.router
    r.add_get("/health", wrap("/health", h.health))
    r.add_get("/v1/models", wrap("/v1/models", h.models))
    r.add_get("/version", wrap("/version", h.version))
    r.add_get("/openapi.json", wrap("/openapi.json", h.openapi))
    r.add_get("/get_model_info", wrap("/get_model_info", h.get_model_info, sglang=True))
    r.add_get("/metrics", wrap("/metrics", h.metrics))
    r.add_get("/admin/faults", wrap("/admin/faults", h.get_faults))
    r.add_post("/admin/faults", wrap("/admin/faults", h.set_faults))
    r.add_post("/admin/metrics/reset", wrap("/admin/metrics/reset", h.reset_metrics))
    r.add_post("/tokenize", wrap("/tokenize", h.tokenize))
    r.add_post("/detokenize", wrap("/detokenize", h.detokenize))
    r.add_post("/v1/completions", wrap("/v1/completions", h.completions))
    r.add_post("/classify", wrap("/classify", h.classify))
    r.add_post("/pooling", wrap("/pooling", h.pooling))
    r.add_post("/generate", wrap("/generate", h.generate, sglang=True))
    return app


class ToyServer:
    """A toy server on the current event loop: ``await start()`` ... ``await stop()``."""

    def __init__(self, options: ToyServerOptions | None = None) -> None:
        self.options = options or ToyServerOptions()
        self.app = create_app(self.options)
        self._state = self.app[_STATE]
        self._runner: web.AppRunner | None = None
        self.host = self.options.host
        self.port = self.options.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def metrics(self) -> dict[str, Any]:
        return self._state.stats.snapshot()

    def reset_metrics(self) -> None:
        self._state.stats.reset()

    async def start(self) -> None:
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.options.host, self.options.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        if addresses:
            self.port = int(addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            if self._state.stopping is not None:
                self._state.stopping.set()
            await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(options: ToyServerOptions | None = None) -> AsyncIterator[ToyServer]:
    """Run a toy server on the running event loop for the duration of the block."""
    server = ToyServer(options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class ToyServerHandle:
    """A toy server running on its own event-loop thread (see `serve_in_thread`)."""

    def __init__(self, options: ToyServerOptions | None = None) -> None:
        self.options = options or ToyServerOptions()
        self._server = ToyServer(self.options)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qalign-toy-server", daemon=True)
        self._stopped = False

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._server.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def start(self, timeout: float = 10.0) -> ToyServerHandle:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the toy server did not start in time")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    def metrics(self) -> dict[str, Any]:
        return self._server.metrics()

    def reset_metrics(self) -> None:
        self._server.reset_metrics()

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped or not self._thread.is_alive():
            self._stopped = True
            return
        self._stopped = True
        fut = asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop)
        try:
            fut.result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> ToyServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(options: ToyServerOptions | None = None) -> Iterator[ToyServerHandle]:
    """Start a toy server on a background event-loop thread; stop it when the block ends."""
    handle = ToyServerHandle(options).start()
    try:
        yield handle
    finally:
        handle.stop()
