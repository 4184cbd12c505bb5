"""A reward model wrapper that never scores the same conversation twice in a process.

MCMC proposals often reproduce a response already scored (a cut near the end that regenerates
the same tokens, or a chain returning to an earlier state); each distinct conversation costs one
reward-model evaluation per process.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import orjson

from qalign.clients.base import Conversation, RewardModel, score_with_tokens


def _key(conv: Conversation) -> bytes:
    # hashed on every step: orjson, not the standard library's encoder
    return hashlib.blake2b(orjson.dumps(conv, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


@dataclass
class ScoreMeter:
    """Within one scoring: calls served whole from a reward cache, and calls that reached a
    reward server."""

    hits: int = 0
    misses: int = 0

    @property
    def free(self) -> bool:
        """Whether the scoring cost no reward server anything (every call a cache hit)."""
        return self.hits > 0 and self.misses == 0


# A mutable meter, so the tasks a composite reward gathers (each with a copy of the context)
# report into the caller's.
_METER: ContextVar[ScoreMeter | None] = ContextVar("qalign_score_meter", default=None)


@contextmanager
def score_meter() -> Iterator[ScoreMeter]:
    """Count, for the scoring inside this block, cache hits and server calls (`note_scoring`)."""
    meter = ScoreMeter()
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


def note_scoring(*, hit: bool) -> None:
    """Tell the current `score_meter` (if any) that a scoring call was a cache hit or not."""
    meter = _METER.get()
    if meter is None:
        return
    if hit:
        meter.hits += 1
    else:
        meter.misses += 1


class CachedReward:
    """LRU cache of (score, reward tokens) keyed by the whole conversation."""

    def __init__(self, inner: RewardModel, maxsize: int = 100_000) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.inner = inner
        self.model = inner.model
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, tuple[float, int | None]] = OrderedDict()

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        scores, _ = await self.score_with_tokens(conversations)
        return scores

    async def score_with_tokens(
        self, conversations: Sequence[Conversation]
    ) -> tuple[list[float], list[int | None]]:
        keys = [_key(c) for c in conversations]
        # several copies of one new conversation in a batch are scored once
        known: dict[bytes, tuple[float, int | None]] = {}
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k in self._items:
                self._items.move_to_end(k)
                known[k] = self._items[k]
            else:
                first.setdefault(k, i)
        todo = list(first.values())
        self.hits += len(conversations) - len(todo)
        self.misses += len(todo)
        note_scoring(hit=not todo)
        if todo:
            batch = [conversations[i] for i in todo]
            scores, counts = await score_with_tokens(self.inner, batch)
            for i, score, count in zip(todo, scores, counts, strict=True):
                known[keys[i]] = (float(score), count)
                if not math.isfinite(score):
                    continue  # a glitch (NaN/inf) rejects this proposal only: ask again next time
                self._items[keys[i]] = known[keys[i]]
                if len(self._items) > self.maxsize:
                    self._items.popitem(last=False)
        out = [known[k] for k in keys]
        return [s for s, _ in out], [n for _, n in out]


class TextCache:
    """LRU of detokenized texts keyed by token ids, bounded in entries and in characters.

    Text is a function of the token ids, so a response seen before (a chain returning to an
    earlier state, a cut near the end that regenerates the same tokens) needs no second
    `/detokenize` request. Keys are 16-byte digests, so memory is the texts themselves.
    """

    def __init__(self, maxsize: int = 65_536, max_chars: int = 32_000_000) -> None:
        if maxsize < 1 or max_chars < 1:
            raise ValueError("maxsize and max_chars must be >= 1")
        self.maxsize = maxsize
        self.max_chars = max_chars
        self.chars = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, str] = OrderedDict()

    @staticmethod
    def _key(token_ids: Sequence[int]) -> bytes:
        return hashlib.blake2b(orjson.dumps(list(token_ids)), digest_size=16).digest()

    def get(self, token_ids: Sequence[int]) -> str | None:
        key = self._key(token_ids)
        text = self._items.get(key)
        if text is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return text

    def put(self, token_ids: Sequence[int], text: str) -> None:
        key = self._key(token_ids)
        old = self._items.pop(key, None)
        if old is not None:
            self.chars -= len(old)
        if len(text) > self.max_chars:
            return
        self._items[key] = text
        self.chars += len(text)
        while len(self._items) > self.maxsize or self.chars > self.max_chars:
            _, dropped = self._items.popitem(last=False)
            self.chars -= len(dropped)
