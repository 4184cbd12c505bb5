"""Rewards built from other rewards: weighted sums, constants and LM log-likelihoods.

Each is a `RewardModel`, so the step function scores with them like with a server. A weighted
sum also reports its terms, which the sweep path stores beside each proposal's total.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from qalign.clients.base import Conversation, RewardModel
from qalign.clients.cache import note_scoring
from qalign.clients.errors import ProtocolError

_PROMPT_CACHE = 4096


class PromptScorer(Protocol):
    """A generator client that can template conversations and return prompt log-probs."""

    model: str

    async def start(self) -> None: ...

    async def chat_prompt(self, messages: Conversation) -> list[int]: ...

    async def conversation_ids(self, messages: Conversation) -> list[int]: ...

    async def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float | None]: ...

    async def close(self) -> None: ...


class ConstantScore:
    """The same reward for every conversation."""

    def __init__(self, value: float, name: str = "constant") -> None:
        self.value = float(value)
        self.model = name

    async def start(self) -> None:
        return None

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return [self.value] * len(conversations)

    async def close(self) -> None:
        return None


class LMLogLikelihood:
    """log p_LM of the assistant reply (or of the whole templated conversation) under a served LM.

    The conversation's template ids must start with the template ids of its prompt (every chat
    template we know does); the reply's log-likelihood then sums the log-probs of the ids after
    that prefix, the turn's closing tokens included. Needs a server with prompt log-probs (vLLM).
    """

    def __init__(self, lm: PromptScorer, *, full_conversation: bool = False) -> None:
        self.lm = lm
        self.full_conversation = full_conversation
        self.model = f"logprob:{lm.model}"
        # A chain's prompt never changes: template it once (bounded, like a small LRU).
        self._prompts: dict[str, list[int]] = {}

    async def start(self) -> None:
        await self.lm.start()

    async def _one(self, conversation: Conversation) -> float:
        if not conversation or conversation[-1].get("role") != "assistant":
            raise ValueError("an LM log-likelihood reward scores conversations ending with a reply")
        ids = await self.lm.conversation_ids(conversation)
        logprobs = await self.lm.prompt_logprobs(ids)
        start = 0
        if not self.full_conversation:
            prompt = await self._prompt_ids(conversation[:-1])
            if ids[: len(prompt)] != prompt:
                raise ProtocolError(
                    f"{self.lm.model}: the templated conversation does not start with its "
                    "templated prompt, so the reply's tokens cannot be told apart; use "
                    "full_conversation=True"
                )
            start = len(prompt)
        return math.fsum(lp for lp in logprobs[start:] if lp is not None)

    async def _prompt_ids(self, messages: Conversation) -> list[int]:
        key = json.dumps(messages, sort_keys=True)
        ids = self._prompts.get(key)
        if ids is None:
            ids = await self.lm.chat_prompt(messages)
            if len(self._prompts) >= _PROMPT_CACHE:
                self._prompts.pop(next(iter(self._prompts)))
            self._prompts[key] = ids
        return ids

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        note_scoring(hit=False)  # uncached: a composite with a cached term still pays for this
        return list(await asyncio.gather(*(self._one(c) for c in conversations)))

    async def close(self) -> None:
        await self.lm.close()


@dataclass(frozen=True)
class Term:
    """One weighted term of a composite reward."""

    name: str
    weight: float
    reward: RewardModel


class WeightedSum:
    """Σ weight_k · r_k(x, y) over named terms, scored concurrently."""

    def __init__(self, terms: Sequence[Term]) -> None:
        if not terms:
            raise ValueError("a composite reward needs at least one term")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        self.terms = tuple(terms)
        self.model = "+".join(f"{t.weight:g}*{t.reward.model}" for t in terms)

    async def start(self) -> None:
        await asyncio.gather(*(t.reward.start() for t in self.terms))

    async def score_terms(
        self, conversations: Sequence[Conversation]
    ) -> tuple[list[float], list[dict[str, float]]]:
        """Totals and, per conversation, each term's raw (unweighted) reward by name."""
        columns = await asyncio.gather(*(t.reward.score(conversations) for t in self.terms))
        totals: list[float] = []
        per_conv: list[dict[str, float]] = []
        for i in range(len(conversations)):
            raw = {t.name: float(col[i]) for t, col in zip(self.terms, columns, strict=True)}
            per_conv.append(raw)
            totals.append(math.fsum(t.weight * raw[t.name] for t in self.terms))
        return totals, per_conv

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return (await self.score_terms(conversations))[0]

    async def close(self) -> None:
        await asyncio.gather(*(t.reward.close() for t in self.terms))
