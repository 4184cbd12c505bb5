"""The small protocols every generator and reward backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qalign.core.state import Finish

Message = dict[str, Any]
Conversation = list[Message]


@dataclass(frozen=True)
class Continuation:
    """New tokens sampled after an exact token-id prompt.

    `token_ids` always ends with the terminating EOS / stop token when `finish` is STOP (backends
    that omit it from their answer append it), so len(token_ids) is the count used by the kernel.
    """

    token_ids: tuple[int, ...]
    finish: Finish
    logprobs: tuple[float, ...] | None = None  # per new token, when requested
    endpoint: str = ""  # base URL that served the request
    latency_s: float = 0.0


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent explicitly with every generation request."""

    temperature: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


class Generator(Protocol):
    """A language-model server that continues exact token-id prompts."""

    model: str

    async def start(self) -> None:
        """Wait for health, detect features, check the model is served; raise a clear error."""
        ...

    async def chat_prompt(self, messages: Conversation) -> list[int]:
        """Token ids of the chat-templated prompt, ending with the assistant generation prompt."""
        ...

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
        """Sample at most `max_tokens` new tokens after `prompt_ids` (prompt + kept prefix).

        `affinity` (a chain id) pins the request to one replica so its prefix cache is reused.
        """
        ...

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of token ids (for display and for the reward model)."""
        ...

    async def close(self) -> None: ...


class RewardModel(Protocol):
    """A reward-model server scoring whole conversations (prompt messages + assistant reply)."""

    model: str

    async def start(self) -> None: ...

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        """Raw scalar rewards (logits), one per conversation, in order; may be NaN/inf."""
        ...

    async def close(self) -> None: ...


async def score_with_tokens(
    rm: RewardModel, conversations: Sequence[Conversation]
) -> tuple[list[float], list[int | None]]:
    """Rewards plus the tokens the reward model read for each conversation, where the client
    reports them (vLLM's does); None counts otherwise."""
    detailed = getattr(rm, "score_with_tokens", None)
    if detailed is not None:
        scores, counts = await detailed(conversations)
        return list(scores), list(counts)
    return await rm.score(conversations), [None] * len(conversations)
