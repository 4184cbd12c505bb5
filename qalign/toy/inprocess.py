"""The toy model behind the Generator / RewardModel protocols, without HTTP.

Used where a test needs hundreds of thousands of steps through the real step function (the
exactness checks); the HTTP toy server samples from the same distributions.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from qalign.clients.base import Continuation, Conversation, SamplingParams
from qalign.core.state import Finish
from qalign.toy.model import EOS, ToyModel


def _rng(seed: int, prompt_ids: Sequence[int]) -> random.Random:
    digest = hashlib.blake2b(repr((seed, tuple(prompt_ids))).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


class ToyGenerator:
    """Samples continuations from `ToyModel`, deterministically per (seed, prompt ids)."""

    def __init__(self, model: ToyModel | None = None, name: str = "toy") -> None:
        self.toy = model or ToyModel()
        self.model = name
        self.calls = 0

    async def start(self) -> None:
        return None

    async def chat_prompt(self, messages: Conversation) -> list[int]:
        return self.toy.chat_ids(messages, add_generation_prompt=True)

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
        self.calls += 1
        rng = _rng(seed, prompt_ids)
        response = self.toy.response_of(prompt_ids)
        prev = response[-1] if response else None
        out: list[int] = []
        lps: list[float] = []
        finish = Finish.LENGTH
        while len(out) < max_tokens:
            probs = self.toy.next_probs(prev, params.temperature)
            ids = list(probs)
            tok = rng.choices(ids, weights=[probs[t] for t in ids])[0]
            out.append(tok)
            lps.append(math.log(probs[tok]))
            if tok == EOS or tok in params.stop_token_ids:
                finish = Finish.STOP
                break
            prev = tok
        return Continuation(tuple(out), finish, tuple(lps) if logprobs else None, "inprocess")

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.toy.decode(token_ids)

    async def close(self) -> None:
        return None


class ToyReward:
    """Scores the assistant reply of a conversation with `ToyModel.reward`."""

    def __init__(self, model: ToyModel | None = None, name: str = "toy-rm") -> None:
        self.toy = model or ToyModel()
        self.model = name

    async def start(self) -> None:
        return None

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        out = []
        for conv in conversations:
            ids = self.toy.chat_ids(conv, add_generation_prompt=False)
            out.append(self.toy.reward(self.toy.response_of(ids)))
        return out

    async def close(self) -> None:
        return None
