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
class Zero:
    """Always cut at 0: independent Metropolis-Hastings with the LM as proposal."""

    name: str = "independent"

    def sample(self, length: int, u: float) -> int:
        return 0

    def log_prob(self, index: int, length: int) -> float:
        return 0.0 if index == 0 else -math.inf


def index_distribution(spec: str) -> IndexDistribution:
    """Parse `uniform`, `independent` or `block:N`."""
    if spec == "uniform":
        return Uniform()
    if spec in ("independent", "zero", "imh"):
        return Zero()
    if spec.startswith("block:"):
        try:
            size = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"block size in {spec!r} is not an integer") from None
        return Block(size)
    raise ValueError(
        f"unknown index distribution {spec!r}; use 'uniform', 'independent' or 'block:N'"
    )
