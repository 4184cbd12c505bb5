"""Rebuild full responses from the append-only proposals of a chain."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Replayed:
    """One proposal with its full response ids and the chain's state after it."""

    step: int
    response: tuple[int, ...]
    accepted: bool
    state: tuple[int, ...]


class ReplayError(ValueError):
    """The proposals of a chain are not exactly one per step 0..N."""


def replay(proposals: Iterable[tuple[int, int, Sequence[int], bool]]) -> list[Replayed]:
    """Walk (step, cut, new_tokens, accepted) rows in step order.

    The response of step k is state_{k-1}[:cut] + new_tokens; the state moves on acceptance.
    """
    rows = sorted(proposals, key=lambda r: r[0])
    steps = [r[0] for r in rows]
    if steps != list(range(len(rows))):
        raise ReplayError(f"proposals must cover steps 0..{len(rows) - 1} once each, got {steps}")
    out: list[Replayed] = []
    state: tuple[int, ...] = ()
    for step, cut, new, accepted in rows:
        response = state[:cut] + tuple(new)
        if accepted:
            state = response
        out.append(Replayed(step, response, accepted, state))
    return out
