"""Seed-compatible generator wrapper: `from qalign.model import RemoteVLLM`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qalign.clients import HttpSettings, make_generator
from qalign.clients.base import Conversation, Generator, SamplingParams
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
        backend: "vllm" (default), "sglang" or "llamacpp".
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
        backend: str = "vllm",
        **client_options: Any,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.server_url = server_url.rstrip("/")
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self.max_prompt_length = max_prompt_length
        self.temperature = temperature
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_concurrent_requests = max_concurrent_requests
        settings = HttpSettings(total_timeout=timeout, max_retries=max_retries)
        urls = [u.strip() for u in server_url.split(",") if u.strip()]
        self.generator: Generator = make_generator(
            backend, urls, model_path, settings=settings, **client_options
        )
        run_sync(self.generator.start())
        self._check_budget()
        stop_ids = run_sync(self._stop_ids(list(stop_tokens or [])))
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
            raise ServerRequestError(self.server_url, 0, "this backend cannot tokenize stop tokens")
        return list(await tokenize(text, add_special_tokens=False))

    # ---- seed-style helpers ---------------------------------------------------------------
    async def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Templated prompt ids of one conversation, refusing prompts over the limit."""
        return await templated_prompt(self.generator, conversation, self.max_prompt_length)

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Prompt token ids for each conversation (chat template applied by the server)."""

        async def _all() -> list[list[int]]:
            import asyncio

            return list(await asyncio.gather(*(self.prompt_ids(c) for c in conversations)))

        return run_sync(_all())

    def decode_tokenize(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of several token-id lists."""

        async def _all() -> list[str]:
            import asyncio

            return list(await asyncio.gather(*(self.generator.detokenize(x) for x in ids)))

        return run_sync(_all())

    def ancestral(
        self, input_data: Sequence[Conversation], n: int = 1, use_tqdm: bool = False
    ) -> list[list[str]]:
        """n independent response texts per conversation (the best-of-n / voting baseline)."""
        records = ancestral_records(self, None, input_data, n, seed=None, use_tqdm=use_tqdm)
        return [[r.state_text for r in recs] for recs in records]

    def __str__(self) -> str:
        return f"RemoteVLLM(model_path={self.model_path}, server_url={self.server_url})"
