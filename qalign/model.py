"""Seed-compatible generator wrapper: `from qalign.model import RemoteVLLM`."""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Sequence
from typing import Any

from qalign.clients import HttpSettings, make_generator
from qalign.clients.base import Conversation, Generator, SamplingParams
from qalign.clients.composite import PromptScorer
from qalign.clients.errors import ServerRequestError
from qalign.sampling.ancestral import ancestral_records
from qalign.sampling.loop import run_sync
from qalign.sampling.step import templated_prompt


class RemoteVLLM:
    """A generation server (vLLM by default) driven synchronously, as in the seed package.

    Args:
        server_url: base URL, or several comma-separated URLs of replicas.
        model_path: the served model name (must be listed by the server's /v1/models).
        max_new_tokens: the length budget of a response, EOS included.
        max_prompt_length: templated prompts longer than this raise `PromptTooLongError`.
        stop_tokens: extra stop tokens, as token strings that each map to one token id.
        temperature: sampling temperature of the proposal.
        timeout: total seconds allowed for one HTTP request.
        max_retries: attempts per request before giving up.
        max_concurrent_requests: requests in flight at once across all chains.
        track_logprobs: request per-token log-probs with every generation: `continuation`
            returns their sums and `QAlign` states carry them as `scores`.
        tokenizer_path: accepted for the seed API and unused: the server tokenizes (token ids
            end to end; no local tokenizer is loaded).
        enable_thinking: passed to the server's chat template as
            `chat_template_kwargs={"enable_thinking": ...}` (vLLM backend).
        backend: "vllm" (default), "sglang" or "llamacpp".
        vocab_size: when given, generated ids are checked to be below it.
    """

    def __init__(
        self,
        server_url: str,
        model_path: str,
        max_new_tokens: int = 1024,
        max_prompt_length: int = 1024 * 3,
        stop_tokens: Sequence[str] | None = None,
        temperature: float = 1.0,
        timeout: float = 300,
        max_retries: int = 15,
        max_concurrent_requests: int = 256,
        track_logprobs: bool = False,
        tokenizer_path: str | None = None,
        enable_thinking: bool = False,
        *,
        backend: str = "vllm",
        vocab_size: int | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
        self.server_url = server_url.rstrip("/")
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self.max_prompt_length = max_prompt_length
        self.temperature = temperature
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_concurrent_requests = max_concurrent_requests
        self.track_logprobs = track_logprobs
        self.tokenizer_path = tokenizer_path
        self.enable_thinking = enable_thinking
        self.backend = backend
        settings = HttpSettings(total_timeout=timeout, max_retries=max_retries)
        urls = [u.strip() for u in server_url.split(",") if u.strip()]
        options: dict[str, Any] = {"settings": settings, "vocab_size": vocab_size}
        if enable_thinking:
            if backend != "vllm":
                raise ValueError(
                    f"enable_thinking is sent through vLLM's chat_template_kwargs; backend "
                    f"{backend!r} applies its chat template without them"
                )
            options["chat_template_kwargs"] = {"enable_thinking": True}
        self.generator: Generator = make_generator(backend, urls, model_path, **options)
        run_sync(self.generator.start())
        self._check_budget()
        stop_ids = run_sync(self._stop_ids(list(stop_tokens or [])))
        self.stop_tokens = list(stop_tokens or [])
        self.sampling = SamplingParams(temperature=temperature, stop_token_ids=tuple(stop_ids))

    def _check_budget(self) -> None:
        limit = getattr(self.generator, "max_model_len", None)
        if limit and self.max_prompt_length + self.max_new_tokens > limit:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) + max_new_tokens "
                f"({self.max_new_tokens}) exceeds the server's max_model_len ({limit}) for "
                f"{self.model_path!r}; lower one of them or serve with a longer context"
            )

    async def _stop_ids(self, stop_tokens: list[str]) -> list[int]:
        ids: list[int] = []
        for tok in stop_tokens:
            encoded = await self._token_ids_of(tok)
            if len(encoded) != 1:
                raise ValueError(
                    f"stop token {tok!r} is {len(encoded)} tokens for {self.model_path!r}; "
                    "stop_tokens must each be a single token (we stop on token ids, never on text)"
                )
            ids.append(encoded[0])
        return ids

    async def _token_ids_of(self, text: str) -> list[int]:
        tokenize = getattr(self.generator, "tokenize_text", None)
        if tokenize is None:
            raise ServerRequestError(
                self.server_url, 0, f"backend {self.backend!r} cannot tokenize"
            )
        return list(await tokenize(text, add_special_tokens=False))

    def prompt_scorer(self) -> PromptScorer:
        """The generator client as a prompt log-prob scorer (vLLM backends only)."""
        gen = self.generator
        if not all(hasattr(gen, m) for m in ("conversation_ids", "prompt_logprobs")):
            raise ValueError(
                f"log-likelihood rewards read prompt log-probs, which backend {self.backend!r} "
                "does not serve; use a vLLM server"
            )
        return gen  # type: ignore[return-value]

    async def _gather(self, coros: Sequence[Any]) -> list[Any]:
        limit = asyncio.Semaphore(self.max_concurrent_requests)

        async def one(c: Any) -> Any:
            async with limit:
                return await c

        return list(await asyncio.gather(*(one(c) for c in coros)))

    # ---- seed-style helpers ---------------------------------------------------------------
    async def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Templated prompt ids of one conversation, refusing prompts over the limit."""
        return await templated_prompt(self.generator, conversation, self.max_prompt_length)

    def encode(self, prompts: Sequence[str | Conversation]) -> list[list[int]]:
        """Prompt token ids: a conversation is chat-templated by the server (with the generation
        prompt, refused over `max_prompt_length`); a string (an already templated prompt, as
        the seed passes) is tokenized as it is."""

        async def one(p: str | Conversation) -> list[int]:
            if isinstance(p, str):
                return await self._token_ids_of(p)
            return await self.prompt_ids(p)

        return run_sync(self._gather([one(p) for p in prompts]))

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (no special tokens added)."""
        return run_sync(self._gather([self._token_ids_of(p) for p in prompts]))

    def decode_tokenize(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of several token-id lists."""
        return run_sync(self._gather([self.generator.detokenize(x) for x in ids]))

    def continuation(
        self, prompt: Sequence[Sequence[int]], prefix: Sequence[Sequence[int]] | None = None
    ) -> tuple[list[list[int]], list[float]]:
        """Sample a continuation of each prompt (plus its kept prefix), from exact token ids.

        Returns:
            the new token ids of each continuation (ending with the stop token when it stopped),
            and the sum of their log-probs (0.0 unless `track_logprobs`).
        """
        prefixes: list[Sequence[int]] = [()] * len(prompt) if prefix is None else list(prefix)
        if len(prefixes) != len(prompt):
            raise ValueError(f"{len(prompt)} prompts but {len(prefixes)} prefixes")

        async def one(p: Sequence[int], pre: Sequence[int]) -> tuple[list[int], float]:
            budget = self.max_new_tokens - len(pre)
            if budget < 1:
                raise ValueError(
                    f"a prefix of {len(pre)} tokens leaves no room under max_new_tokens="
                    f"{self.max_new_tokens}"
                )
            cont = await self.generator.generate(
                [*p, *pre],
                max_tokens=budget,
                seed=secrets.randbits(63),
                params=self.sampling,
                logprobs=self.track_logprobs,
            )
            total = math.fsum(cont.logprobs) if cont.logprobs is not None else 0.0
            return list(cont.token_ids), total

        pairs = run_sync(
            self._gather([one(p, pre) for p, pre in zip(prompt, prefixes, strict=True)])
        )
        return [ids for ids, _ in pairs], [lp for _, lp in pairs]

    def ancestral(
        self, conversations: Sequence[Conversation], n: int = 1, use_tqdm: bool = False
    ) -> tuple[list[list[str]], list[float]]:
        """n independent responses per conversation (the best-of-n / voting baseline).

        Returns:
            the response texts grouped per conversation, and each response's log-prob sum
            (a flat list, conversation by conversation), as the seed does.
        """
        records = ancestral_records(
            self, None, conversations, n, seed=None, use_tqdm=use_tqdm, logprobs=True
        )
        texts = [[r.state_text for r in recs] for recs in records]
        sums = [
            math.fsum(r.state.logprobs) if r.state.logprobs is not None else 0.0
            for recs in records
            for r in recs
        ]
        return texts, sums

    def logprobs(self, conversations: Sequence[Conversation]) -> list[list[float]]:
        """Per-token log-probs of each whole templated conversation (the first token's is 0.0)."""
        scorer = self.prompt_scorer()

        async def one(c: Conversation) -> list[float]:
            ids = await scorer.conversation_ids(c)
            return [0.0 if lp is None else lp for lp in await scorer.prompt_logprobs(ids)]

        return run_sync(self._gather([one(c) for c in conversations]))

    def __str__(self) -> str:
        return f"RemoteVLLM(model_path={self.model_path}, server_url={self.server_url})"
