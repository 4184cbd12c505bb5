"""Distributions over the cut index i of a response y (keep y[:i], regenerate the rest).

Each distribution must give every cut it can draw a positive probability under the *proposal* as
well, so that every move has a reverse; `log_prob` is exact and is used in the acceptance ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class IndexDistribution(Protocol):
    """Chooses where to cut a response of a given length."""

    @property
    def name(self) -> str:
        """A short label stored with every run."""
        ...

    def sample(self, length: int, u: float) -> int:
        """Map a uniform draw u in [0, 1) to a cut index in [0, max(length, 1))."""
        ...

    def log_prob(self, index: int, length: int) -> float:
        """log P(index | length); -inf when the index cannot be drawn."""
        ...


def _slots(length: int) -> int:
    # An empty response (possible only if a server returns nothing) can still be cut at 0.
    return max(length, 1)


@dataclass(frozen=True)
class Uniform:
    """Uniform over {0, ..., |y|-1}: the QAlign / QUEST default."""

    name: str = "uniform"

    def sample(self, length: int, u: float) -> int:
        return min(int(u * _slots(length)), _slots(length) - 1)

    def log_prob(self, index: int, length: int) -> float:
        n = _slots(length)
        return -math.log(n) if 0 <= index < n else -math.inf


@dataclass(frozen=True)
class Block:
    """Uniform over the block starts {0, B, 2B, ...} below |y|: fewer, larger moves."""

    size: int
    name: str = "block"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"block size must be >= 1, got {self.size}")

    def _blocks(self, length: int) -> int:
        return -(-_slots(length) // self.size)

    def sample(self, length: int, u: float) -> int:
        k = self._blocks(length)
        return min(int(u * k), k - 1) * self.size

    def log_prob(self, index: int, length: int) -> float:
        if index < 0 or index % self.size or index >= _slots(length):
            return -math.inf
        return -math.log(self._blocks(length))


@dataclass(frozen=True)
class LastBlock:
    """Uniform over the last B cut positions {max(0, |y|-B), ..., |y|-1}: moves stay near the end.

    The window slides with the response, so a proposal longer than its cut + B tokens cannot be
    reversed (its window no longer holds the cut) and is rejected through `log_prob` = -inf; a
    proposal ending right after the cut moves the window back, which is how earlier tokens get
    resampled. B = 1 is refused: the response could then never shrink and its first |y|-1
    tokens would be frozen (the chain would not reach the whole target).
    """

    size: int
    name: str = "last_block"

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(
                f"last_block size must be >= 2 (with 1 every earlier token is frozen), "
                f"got {self.size}"
            )

    def _start(self, length: int) -> int:
        return max(0, _slots(length) - self.size)

    def sample(self, length: int, u: float) -> int:
        start = self._start(length)
        n = _slots(length) - start
        return start + min(int(u * n), n - 1)

    def log_prob(self, index: int, length: int) -> float:
        start = self._start(length)
        if not start <= index < _slots(length):
            return -math.inf
        return -math.log(_slots(length) - start)


@dataclass(frozen=True)
class Zero:
    """Always cut at 0: independent Metropolis-Hastings with the LM as proposal."""

    name: str = "independent"

    def sample(self, length: int, u: float) -> int:
        return 0

    def log_prob(self, index: int, length: int) -> float:
        return 0.0 if index == 0 else -math.inf


def _size(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"block size in {spec!r} is not an integer") from None


def index_distribution(spec: str) -> IndexDistribution:
    """Parse `uniform`, `independent`, `block:N` or `last_block:N`."""
    if spec == "uniform":
        return Uniform()
    if spec in ("independent", "zero", "imh"):
        return Zero()
    if spec.startswith("block:"):
        return Block(_size(spec))
    if spec.startswith("last_block:"):
        return LastBlock(_size(spec))
    raise ValueError(
        f"unknown index distribution {spec!r}; use 'uniform', 'independent', 'block:N' or "
        "'last_block:N'"
    )
