"""The state of one Markov chain: a response as exact token ids, with its reward."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Finish(StrEnum):
    """Why generation of a response ended."""

    STOP = "stop"  # ended on EOS / a stop token; that token is the last id of the response
    LENGTH = "length"  # hit the length budget (`max_new_tokens`)


@dataclass(frozen=True, slots=True)
class State:
    """A response y to a fixed prompt.

    `tokens` includes the terminating EOS token when `finish` is STOP, so |y| counts it and a cut
    can land on it: every proposal then regenerates at least one token and every move has a
    reverse. `logprobs`, when known, holds log p(y_t | x, y_<t) for every token (needed by QUEST).
    """

    tokens: tuple[int, ...]
    reward: float
    finish: Finish
    logprobs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and len(self.logprobs) != len(self.tokens):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries for {len(self.tokens)} tokens"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def reward_is_finite(self) -> bool:
        return math.isfinite(self.reward)

    @property
    def text_tokens(self) -> tuple[int, ...]:
        """The ids to detokenize for display and reward: the response without its stop token."""
        if self.finish is Finish.STOP and self.tokens:
            return self.tokens[:-1]
        return self.tokens

    def suffix_logprob(self, start: int) -> float:
        """log p(y_{>=start} | x, y_<start); requires per-token logprobs."""
        if self.logprobs is None:
            raise ValueError("this state carries no per-token logprobs (needed by QUEST)")
        return math.fsum(self.logprobs[start:])
