"""Generator and reward-model clients for vLLM, SGLang and llama.cpp servers.

    gen = make_generator("vllm", ["http://gpu1:8000", "http://gpu2:8000"], "llama-3.1-8b")
    rm = make_reward("auto", "http://gpu3:8001", "skywork-rm")
    await gen.start(); await rm.start()
    ...
    await gen.close(); await rm.close(); await close_sessions()

Every client takes `settings=HttpSettings(...)` (timeouts, retries, API key) and one URL or a list
of replica URLs (a string may hold several, comma or space separated).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from qalign.clients.base import (
    Continuation,
    Conversation,
    Generator,
    Message,
    RewardModel,
    SamplingParams,
)
from qalign.clients.errors import (
    ClientError,
    ModelNotServedError,
    PromptTooLongError,
    ProtocolError,
    RetryableStatusError,
    ServerRequestError,
    ServerUnavailableError,
)
from qalign.clients.http import (
    ContextLengthError,
    Endpoint,
    EndpointPool,
    HttpSettings,
    Reply,
    TemplateUnavailableError,
    TransientStatusError,
    close_sessions,
    error_message,
    get_session,
    normalize_urls,
)
from qalign.clients.llamacpp import LlamaCppGenerator
from qalign.clients.sglang import SGLangGenerator, SGLangReward, render_plain
from qalign.clients.vllm import VLLMGenerator, VLLMReward

log = logging.getLogger(__name__)

GENERATOR_BACKENDS = ("vllm", "sglang", "llamacpp")
REWARD_BACKENDS = ("vllm", "vllm-pooling", "sglang", "auto")

_GEN_ALIASES = {"llama.cpp": "llamacpp", "llama-cpp": "llamacpp", "llama_cpp": "llamacpp"}
_RM_ALIASES = {"vllm_pooling": "vllm-pooling", "pooling": "vllm-pooling"}


def _backend(name: str, allowed: Sequence[str], aliases: dict[str, str], what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what} backend must be a string, not {type(name).__name__}")
    key = name.strip().lower()
    key = aliases.get(key, key)
    if key not in allowed:
        raise ValueError(f"unknown {what} backend {name!r}; choose one of: {', '.join(allowed)}")
    return key


def make_generator(
    backend: str, urls: str | Iterable[str], model: str, **kw: Any
) -> VLLMGenerator | SGLangGenerator | LlamaCppGenerator:
    """A `Generator` for `backend` ("vllm" | "sglang" | "llamacpp"); `kw` go to its class."""
    kind = _backend(backend, GENERATOR_BACKENDS, _GEN_ALIASES, "generator")
    url_list = normalize_urls(urls)
    if kind == "vllm":
        return VLLMGenerator(url_list, model, **kw)
    if kind == "sglang":
        return SGLangGenerator(url_list, model, **kw)
    return LlamaCppGenerator(url_list, model, **kw)


def make_reward(
    backend: str, urls: str | Iterable[str], model: str, **kw: Any
) -> VLLMReward | SGLangReward | AutoReward:
    """A `RewardModel` for `backend` ("vllm" | "vllm-pooling" | "sglang" | "auto")."""
    kind = _backend(backend, REWARD_BACKENDS, _RM_ALIASES, "reward")
    url_list = normalize_urls(urls)
    if kind == "vllm":
        return VLLMReward(url_list, model, **kw)
    if kind == "vllm-pooling":
        return VLLMReward(url_list, model, endpoint="pooling", **kw)
    if kind == "sglang":
        return SGLangReward(url_list, model, **kw)
    return AutoReward(url_list, model, **kw)


class AutoReward:
    """A reward client that detects the server kind at `start()` and delegates to it.

    SGLang answers `GET /get_model_info`; a vLLM pooling server answers `POST /classify` with
    `input` (else `POST /pooling`). Keyword arguments are passed to the detected class.
    """

    def __init__(self, urls: str | Iterable[str], model: str, **kw: Any) -> None:
        self.model = model
        self.urls = normalize_urls(urls)
        self.kw = kw
        self.backend: str | None = None
        self.inner: VLLMReward | SGLangReward | None = None

    async def detect(self) -> str:
        settings = self.kw.get("settings")
        pool = EndpointPool(self.urls, settings, name=f"reward detection {self.model!r}")
        try:
            await pool.wait_healthy("/health", timeout=float(self.kw.get("startup_timeout", 600)))
            info = await pool.try_get_json("/get_model_info")
            if isinstance(info, dict) and ("model_path" in info or "is_generation" in info):
                return "sglang"
            probe = {"model": self.model, "input": ["Hello"], "use_activation": False}
            causes: list[str] = []
            for path, kind in (("/classify", "vllm"), ("/pooling", "vllm-pooling")):
                try:
                    await pool.request("POST", path, probe, parse=_has_data, max_attempts=2)
                except ClientError as exc:
                    causes.append(f"{path}: {exc}")
                    continue
                return kind
        finally:
            await pool.close()
        raise ClientError(
            f"cannot tell which reward server runs at {', '.join(self.urls)}: neither SGLang"
            " (/get_model_info) nor a vLLM pooling server (/classify, /pooling) answered"
            f" ({'; '.join(causes)}); choose the backend explicitly"
        )

    async def start(self) -> None:
        if self.inner is None:
            self.backend = await self.detect()
            kw = dict(self.kw)
            if self.backend == "vllm-pooling":
                kw["endpoint"] = "pooling"
            cls: type[SGLangReward] | type[VLLMReward]
            cls = SGLangReward if self.backend == "sglang" else VLLMReward
            accepted = inspect.signature(cls.__init__).parameters
            dropped = sorted(k for k in kw if k not in accepted)
            if dropped:
                log.warning("%s does not take %s; ignored", cls.__name__, ", ".join(dropped))
            kw = {k: v for k, v in kw.items() if k in accepted}
            self.inner = cls(self.urls, self.model, **kw)
        await self.inner.start()

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        if self.inner is None:
            raise ClientError("AutoReward.start() must run before score()")
        return await self.inner.score(conversations)

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()


def _has_data(data: Any) -> Any:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ProtocolError("answer has no 'data' list")
    return data


if TYPE_CHECKING:  # mypy proves every client implements its protocol

    def _conforms(
        g1: VLLMGenerator,
        g2: SGLangGenerator,
        g3: LlamaCppGenerator,
        r1: VLLMReward,
        r2: SGLangReward,
        r3: AutoReward,
    ) -> tuple[list[Generator], list[RewardModel]]:
        return [g1, g2, g3], [r1, r2, r3]


__all__ = [
    "GENERATOR_BACKENDS",
    "REWARD_BACKENDS",
    "AutoReward",
    "ClientError",
    "ContextLengthError",
    "Continuation",
    "Conversation",
    "Endpoint",
    "EndpointPool",
    "Generator",
    "HttpSettings",
    "LlamaCppGenerator",
    "Message",
    "ModelNotServedError",
    "PromptTooLongError",
    "ProtocolError",
    "Reply",
    "RetryableStatusError",
    "RewardModel",
    "SGLangGenerator",
    "SGLangReward",
    "SamplingParams",
    "ServerRequestError",
    "ServerUnavailableError",
    "TemplateUnavailableError",
    "TransientStatusError",
    "VLLMGenerator",
    "VLLMReward",
    "close_sessions",
    "error_message",
    "get_session",
    "make_generator",
    "make_reward",
    "normalize_urls",
    "render_plain",
]
