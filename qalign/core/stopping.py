"""Convergence-driven stopping (`stop_when`): when a prompt's chains may retire. Pure.

A prompt's chains are checked at *checkpoints*, the steps c = min_steps, min_steps + every, ...
Before any chain of the prompt takes step c + 1, every chain must have committed step c (the
chains wait for each other there); the verdict is then a function of the states after steps
0..c of every chain alone, so it is the same whoever computes it, whenever, on either runner.

The chains converged at c when, for both the state's reward and its response length, the
rank-normalised split-R-hat is <= `rhat` and the bulk ESS is >= `ess`. A quantity that is
constant over every state of every chain has no R-hat (0/0) and nothing left to mix: it passes.
Any other undefined value (an unscored state, too few draws) fails.

NumPy comes in through `qalign.core.diagnostics`, imported by `verdict` only: a sweep without
`stop_when` never loads it on the step path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MIN_STEPS = 20
DEFAULT_EVERY = 5
QUANTITIES = ("reward", "length")


@dataclass(frozen=True)
class StopRule:
    """A run's `stop_when`: thresholds and where the checkpoints are."""

    rhat: float
    ess: float
    min_steps: int = DEFAULT_MIN_STEPS
    every: int = DEFAULT_EVERY

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rhat) and self.rhat > 1.0):
            raise ValueError(f"stop_when.rhat must be a finite number > 1, got {self.rhat!r}")
        if not (math.isfinite(self.ess) and self.ess > 0):
            raise ValueError(f"stop_when.ess must be a finite number > 0, got {self.ess!r}")
        if self.min_steps < 3:
            # split-R-hat needs >= 4 draws per chain: states 0..3
            raise ValueError(f"stop_when.min_steps must be >= 3, got {self.min_steps}")
        if self.every < 1:
            raise ValueError(f"stop_when.every must be >= 1, got {self.every}")

    def is_checkpoint(self, step: int) -> bool:
        """Whether the chains of a prompt are checked once they have all committed `step`."""
        return step >= self.min_steps and (step - self.min_steps) % self.every == 0

    def to_config(self) -> dict[str, Any]:
        return {"rhat": self.rhat, "ess": self.ess, "min_steps": self.min_steps,
                "every": self.every}  # fmt: skip

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> StopRule | None:
        if not cfg:
            return None
        return cls(
            rhat=float(cfg["rhat"]),
            ess=float(cfg["ess"]),
            min_steps=int(cfg.get("min_steps", DEFAULT_MIN_STEPS)),
            every=int(cfg.get("every", DEFAULT_EVERY)),
        )


@dataclass(frozen=True)
class Verdict:
    """The check of one prompt at one checkpoint: per quantity (R-hat, bulk ESS), and the call."""

    converged: bool
    rhat: dict[str, float]
    ess_bulk: dict[str, float]


def state_traces(
    rows: Iterable[tuple[int, int, bool, float | None, int]], upto: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Per chain (in first-seen order): the state reward and length after steps 0..`upto`.

    `rows` are (chain key, step, accepted, reward, response_len) of proposals in (chain, step)
    order; a rejected proposal leaves the state as it was, a NULL reward is NaN. A chain missing
    a step before `upto` gets a shorter trace (the caller decides what that means).
    """
    rewards: dict[int, list[float]] = {}
    lengths: dict[int, list[float]] = {}
    for chain, step, accepted, reward, length in rows:
        r, n = rewards.setdefault(chain, []), lengths.setdefault(chain, [])
        if step > upto or step != len(r):
            continue
        if accepted or step == 0:
            r.append(math.nan if reward is None else float(reward))
            n.append(float(length))
        else:
            r.append(r[-1])
            n.append(n[-1])
    return list(rewards.values()), list(lengths.values())


def _passes(values: Sequence[Sequence[float]], rule: StopRule) -> tuple[bool, float, float]:
    from qalign.core.diagnostics import diagnose

    d = diagnose(values)
    flat = [v for chain in values for v in chain]
    if flat and not any(math.isnan(v) for v in flat) and min(flat) == max(flat):
        return True, d.rhat, d.ess_bulk  # constant everywhere: nothing to mix
    ok = d.rhat <= rule.rhat and d.ess_bulk >= rule.ess  # False for NaN
    return ok, d.rhat, d.ess_bulk


def verdict(
    rewards: Sequence[Sequence[float]], lengths: Sequence[Sequence[float]], rule: StopRule
) -> Verdict:
    """Whether chains with these state traces (chains x states, equal lengths) converged."""
    if len(rewards) < 2 or len({len(t) for t in rewards}) != 1:
        raise ValueError("a verdict needs >= 2 chains with traces of one length")
    checks = {q: _passes(v, rule) for q, v in zip(QUANTITIES, (rewards, lengths), strict=True)}
    return Verdict(
        converged=all(ok for ok, _, _ in checks.values()),
        rhat={q: c[1] for q, c in checks.items()},
        ess_bulk={q: c[2] for q, c in checks.items()},
    )


__all__ = ["DEFAULT_EVERY", "DEFAULT_MIN_STEPS", "StopRule", "Verdict", "state_traces", "verdict"]
