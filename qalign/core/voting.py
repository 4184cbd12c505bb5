"""Aggregating several sampled answers into one prediction."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

A = TypeVar("A", bound=Hashable)


def majority_vote(answers: Sequence[A | None]) -> A | None:
    """The most frequent answer; ties go to the one seen first; None answers are ignored."""
    counts: dict[A, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda a: counts[a])  # dicts keep first-seen order; max keeps first


def weighted_vote(
    answers: Sequence[A | None], rewards: Sequence[float], temperature: float = 1.0
) -> A | None:
    """The answer with the largest total softmax(r / temperature) weight."""
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pairs = [(a, r) for a, r in zip(answers, rewards, strict=True) if a is not None]
    pairs = [(a, r) for a, r in pairs if not math.isnan(r)]
    if not pairs:
        return None
    top = max(r for _, r in pairs)
    if top == math.inf:
        pairs = [(a, 0.0 if r == math.inf else -math.inf) for a, r in pairs]
        top = 0.0
    weights: dict[A, float] = {}
    for a, r in pairs:
        weights[a] = weights.get(a, 0.0) + math.exp((r - top) / temperature)
    return max(weights, key=lambda a: weights[a])


def best_of_n(answers: Sequence[A | None], rewards: Sequence[float]) -> A | None:
    """The answer of the highest-reward sample (first on ties; NaN rewards ignored)."""
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    best: A | None = None
    best_r = -math.inf
    for a, r in zip(answers, rewards, strict=True):
        if a is None or math.isnan(r):
            continue
        if best is None or r > best_r:
            best, best_r = a, r
    return best
