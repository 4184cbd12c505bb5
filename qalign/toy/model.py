"""A tiny language model and reward whose QAlign / QUEST / power targets can be enumerated
exactly.

Token ids: a few specials, a handful of word tokens, and a reversible byte encoding (ids >= 2**20)
for any other word so that arbitrary prompts tokenize statelessly. The response distribution is a
bigram chain over the word tokens and EOS that does not depend on the prompt; rewards add up
per-word values. Both are small enough to list every response of up to a few tokens.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BOS, EOS, USER, ASSISTANT, END, SYSTEM = 0, 1, 2, 3, 4, 5
SPECIALS = {
    BOS: "<s>",
    EOS: "</s>",
    USER: "<|user|>",
    ASSISTANT: "<|assistant|>",
    END: "<|end|>",
    SYSTEM: "<|system|>",
}
ROLE_IDS = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}
WORD_BASE = 10
BYTE_BASE = 1 << 20
_CHUNK = 6

DEFAULT_WORDS = ("yes", "no", "maybe", "so")
# Bigram logits: row = previous token (START first, then each word), columns = EOS then each word.
DEFAULT_LOGITS = (
    (-1.0, 0.5, 0.2, 0.0, -0.3),  # START
    (0.3, -0.5, 0.1, 0.4, 0.0),  # after "yes"
    (0.0, 0.3, -0.4, 0.2, 0.1),  # after "no"
    (-0.2, 0.2, 0.3, -0.8, 0.5),  # after "maybe"
    (0.5, 0.1, 0.0, 0.3, -1.0),  # after "so"
)
DEFAULT_VALUES = {"yes": 1.0, "no": -0.5, "maybe": 0.3, "so": 0.0}


class ToyTokenizeError(ValueError):
    """A token id that the toy vocabulary cannot decode."""


@dataclass(frozen=True)
class ToyModel:
    """Bigram LM over `words` + EOS, and an additive reward over the same words."""

    words: tuple[str, ...] = DEFAULT_WORDS
    logits: tuple[tuple[float, ...], ...] = DEFAULT_LOGITS
    values: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_VALUES))
    # Extra reward for exact responses (word tuples, EOS ignored): a proxy reward's blind spots.
    bonus: Mapping[tuple[str, ...], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.words)
        if len(self.logits) != k + 1 or any(len(row) != k + 1 for row in self.logits):
            raise ValueError(f"logits must be a {k + 1}x{k + 1} table for {k} words")

    # ---- vocabulary -----------------------------------------------------------------------
    @property
    def word_ids(self) -> tuple[int, ...]:
        return tuple(range(WORD_BASE, WORD_BASE + len(self.words)))

    @property
    def vocab_size(self) -> int:
        return WORD_BASE + len(self.words)

    def encode(self, text: str) -> list[int]:
        """Whitespace-split words; known words and special markers map to their ids."""
        index = {w: WORD_BASE + i for i, w in enumerate(self.words)}
        specials = {v: k for k, v in SPECIALS.items()}
        ids: list[int] = []
        for word in text.split():
            if word in index:
                ids.append(index[word])
            elif word in specials:
                ids.append(specials[word])
            else:
                raw = word.encode()
                for start in range(0, len(raw), _CHUNK):
                    chunk = b"\x01" + raw[start : start + _CHUNK]
                    ids.append(BYTE_BASE + int.from_bytes(chunk, "big"))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        words: list[str] = []
        pending = b""
        for t in ids:
            if t >= BYTE_BASE:
                raw = (t - BYTE_BASE).to_bytes(8, "big").lstrip(b"\x00")
                if not raw.startswith(b"\x01"):
                    raise ToyTokenizeError(f"token id {t} is not a toy byte token")
                pending += raw[1:]
                if len(raw) - 1 < _CHUNK:
                    words.append(pending.decode(errors="replace"))
                    pending = b""
                continue
            if pending:
                words.append(pending.decode(errors="replace"))
                pending = b""
            if t in SPECIALS:
                if not skip_special:
                    words.append(SPECIALS[t])
            elif WORD_BASE <= t < self.vocab_size:
                words.append(self.words[t - WORD_BASE])
            else:
                raise ToyTokenizeError(f"token id {t} is outside the toy vocabulary")
        if pending:
            words.append(pending.decode(errors="replace"))
        return " ".join(words)

    def chat_ids(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool
    ) -> list[int]:
        """The toy chat template: <s> then <role> content <|end|> per message."""
        ids = [BOS]
        for m in messages:
            role = m.get("role")
            if role not in ROLE_IDS:
                raise ValueError(f"unknown chat role {role!r}")
            content = m.get("content")
            if not isinstance(content, str):
                raise ValueError("message content must be a string")
            ids += [ROLE_IDS[role], *self.encode(content), END]
        if add_generation_prompt:
            ids.append(ASSISTANT)
        return ids

    @staticmethod
    def response_of(ids: Sequence[int]) -> list[int]:
        """The response part of a prompt+response id sequence: after the last <|assistant|>."""
        last = max((i for i, t in enumerate(ids) if t == ASSISTANT), default=-1)
        out = []
        for t in ids[last + 1 :]:
            if t in (END,):
                break
            out.append(t)
        return out

    # ---- language model ---------------------------------------------------------------------
    def next_probs(self, prev: int | None, temperature: float = 1.0) -> dict[int, float]:
        """p(next | previous response token) over EOS and the word ids."""
        if temperature <= 0:
            raise ValueError("the toy model needs temperature > 0")
        row = (
            0 if prev is None or not (WORD_BASE <= prev < self.vocab_size) else prev - WORD_BASE + 1
        )
        ids = (EOS, *self.word_ids)
        scaled = [x / temperature for x in self.logits[row]]
        top = max(scaled)
        weights = [math.exp(x - top) for x in scaled]
        total = math.fsum(weights)
        return {t: w / total for t, w in zip(ids, weights, strict=True)}

    def sequence_logprob(
        self, response: Sequence[int], start: int = 0, temperature: float = 1.0
    ) -> float:
        """log p(response[start:] | response[:start]) under the bigram model."""
        total = 0.0
        for i in range(start, len(response)):
            prev = response[i - 1] if i > 0 else None
            p = self.next_probs(prev, temperature).get(response[i], 0.0)
            if p == 0.0:
                return -math.inf
            total += math.log(p)
        return total

    def prompt_logprobs(self, ids: Sequence[int]) -> list[float | None]:
        """log p(ids[i] | ids[:i]) at temperature 1, as a server's prompt log-probs (None first).

        Inside an assistant turn (after <|assistant|>) word tokens follow the bigram LM and the
        closing <|end|> counts as EOS, so a templated reply scores log p_LM(reply + EOS); every
        other token of the template has probability 1 (log-prob 0).
        """
        out: list[float | None] = []
        in_reply = False
        prev: int | None = None
        for i, t in enumerate(ids):
            if i == 0:
                out.append(None)
            elif in_reply and (t in (EOS, END) or WORD_BASE <= t < self.vocab_size):
                p = self.next_probs(prev).get(EOS if t == END else t, 0.0)
                out.append(math.log(p) if p > 0 else -math.inf)
            else:
                out.append(0.0)
            if t == ASSISTANT:
                in_reply, prev = True, None
            elif t in (EOS, END):
                in_reply = False
            elif in_reply:
                prev = t
        return out

    def reply_logprob(self, response: Sequence[int]) -> float:
        """What `prompt_logprobs` sums over a templated reply of `response`: its words then EOS."""
        words = [t for t in response if WORD_BASE <= t < self.vocab_size]
        return self.sequence_logprob((*words, EOS))

    def reward(self, response: Sequence[int]) -> float:
        """Sum of per-word values (EOS and unknown tokens are worth 0), plus any exact bonus."""
        total = 0.0
        words = []
        for t in response:
            if WORD_BASE <= t < self.vocab_size:
                word = self.words[t - WORD_BASE]
                words.append(word)
                total += float(self.values.get(word, 0.0))
        if self.bonus:
            total += float(self.bonus.get(tuple(words), 0.0))
        return total

    # ---- exact distributions --------------------------------------------------------------
    def responses(self, max_new_tokens: int) -> list[tuple[int, ...]]:
        """Every response of the capped LM: words then EOS (<= cap tokens) or exactly cap words."""
        out: list[tuple[int, ...]] = []
        for k in range(max_new_tokens):
            for words in itertools.product(self.word_ids, repeat=k):
                out.append((*words, EOS))
        out.extend(itertools.product(self.word_ids, repeat=max_new_tokens))
        return out

    def lm_distribution(
        self, max_new_tokens: int, temperature: float = 1.0
    ) -> dict[tuple[int, ...], float]:
        """Exact p_LM(y) of every response under the length cap (sums to 1)."""
        return {
            y: math.exp(self.sequence_logprob(y, 0, temperature))
            for y in self.responses(max_new_tokens)
        }

    def target(
        self,
        beta: float,
        max_new_tokens: int,
        method: str = "qalign",
        temperature: float = 1.0,
        reward: Callable[[tuple[int, ...]], float] | None = None,
        alpha: float | None = None,
    ) -> dict[tuple[int, ...], float]:
        """Exact target: qalign ∝ p_LM(y) exp(r/beta); quest ∝ exp(r/beta) on the LM's support;
        power ∝ p_LM(y)^alpha (`beta` and the reward unused).

        `reward` replaces the model's own reward (e.g. a composite of several toy rewards).
        """
        lm = self.lm_distribution(max_new_tokens, temperature)
        reward_of = self.reward if reward is None else reward
        logw: dict[tuple[int, ...], float] = {}
        for y, p in lm.items():
            if method == "power":
                if alpha is None:
                    raise ValueError("the power target needs alpha")
                logw[y] = alpha * math.log(p)
                continue
            base = math.log(p) if method == "qalign" else 0.0
            logw[y] = base + reward_of(y) / beta
        top = max(logw.values())
        w = {y: math.exp(v - top) for y, v in logw.items()}
        z = math.fsum(w.values())
        return {y: v / z for y, v in w.items()}
