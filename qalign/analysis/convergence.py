"""Convergence diagnostics of a run's stored chains: R-hat and bulk/tail ESS per prompt and run.

For each prompt, the draws of a quantity are the chains' **states** after every step (the state
after step k is the last accepted proposal at or before k; step 0, the initial sample, is
always accepted and is included, as every stored state is a draw of the chain), as an array of
shape (chains, steps + 1). Two quantities are diagnosed:

* `reward`: the state's reward (NaN when it was not scored, which makes that prompt's
  diagnostics NaN);
* `length`: the state's response length in tokens (`proposals.response_len`).

`qalign.core.diagnostics` computes the rank-normalised split-R-hat and the bulk and tail ESS of
each prompt's array (Vehtari et al. 2021; equal to ArviZ's). A chain still running contributes
the steps it has committed: a prompt's chains are cut to the shortest of them, and a chain with
a gap keeps its contiguous prefix. `burn_in` drops the first states of every chain.

**Pooled per run** (`Pooled`), over the prompts whose value is defined (NaN is not a failure: it
is what every chain constant at one value, fewer than 4 states or fewer than 2 chains give):

* `rhat_max`, `rhat_median`: the largest and the median prompt R-hat (inf: some prompt's
  chains are each constant at different values, so they never mix);
* `rhat_over`: prompts with R-hat above 1.01, the threshold Vehtari et al. recommend;
* `rhat_infinite`: of those, prompts with an infinite R-hat (JSON has no number for it:
  `rhat_max` is then null, like when no prompt has a defined R-hat);
* `undefined`: prompts whose R-hat is NaN;
* `ess_bulk_min`, `ess_bulk_median`, `ess_tail_min`, `ess_tail_median`: the smallest and the
  median prompt ESS (each prompt's ESS counts the draws of all its chains).

Only runs with chains (`qalign`, `quest`) are diagnosed: an `ancestral` run has one draw per
chain.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select

from qalign.core.diagnostics import Diagnostics, diagnose, summarise
from qalign.storage.models import Chain, Prompt, Proposal
from qalign.storage.repo import Sessions

QUANTITIES = ("reward", "length")
RHAT_THRESHOLD = 1.01
STREAM_BATCH = 5000


@dataclass(frozen=True)
class PromptDiagnostics:
    """One prompt's diagnostics of each quantity over its chains."""

    prompt_index: int
    chains: int
    draws: int  # states per chain (after the burn-in)
    reward: Diagnostics
    length: Diagnostics

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "chains": self.chains,
            "draws": self.draws,
            **{q: _diag_json(getattr(self, q)) for q in QUANTITIES},
        }


@dataclass(frozen=True)
class Pooled:
    """One quantity's diagnostics over the prompts of a run (see the module docstring)."""

    prompts: int  # prompts diagnosed
    undefined: int  # ... whose R-hat is NaN
    rhat_max: float
    rhat_median: float
    rhat_over: int
    rhat_infinite: int  # ... whose chains are each constant at a different value (never mix)
    ess_bulk_min: float
    ess_bulk_median: float
    ess_tail_min: float
    ess_tail_median: float

    @classmethod
    def of(cls, diags: list[Diagnostics]) -> Pooled:
        """Pool the prompts' diagnostics of one quantity."""
        rhats = [d.rhat for d in diags]
        _, rhat_median, rhat_max = summarise(rhats)
        bulk_min, bulk_median, _ = summarise([d.ess_bulk for d in diags])
        tail_min, tail_median, _ = summarise([d.ess_tail for d in diags])
        return cls(
            prompts=len(diags),
            undefined=sum(math.isnan(r) for r in rhats),
            rhat_max=rhat_max,
            rhat_median=rhat_median,
            rhat_over=sum(r > RHAT_THRESHOLD for r in rhats),
            rhat_infinite=sum(r == math.inf for r in rhats),
            ess_bulk_min=bulk_min,
            ess_bulk_median=bulk_median,
            ess_tail_min=tail_min,
            ess_tail_median=tail_median,
        )

    @property
    def ess_min(self) -> float:
        """The smaller of the minimum bulk and tail ESS (NaN when both are)."""
        finite = [x for x in (self.ess_bulk_min, self.ess_tail_min) if not math.isnan(x)]
        return min(finite) if finite else math.nan

    def to_json(self) -> dict[str, Any]:
        """The fields and `ess_min`; NaN and inf as None."""
        return {k: _num(v) for k, v in {**self.__dict__, "ess_min": self.ess_min}.items()}


@dataclass(frozen=True)
class RunDiagnostics:
    """A run's diagnostics: per prompt, and pooled over its prompts per quantity."""

    run_id: int
    burn_in: int
    reward: Pooled
    length: Pooled
    prompts: list[PromptDiagnostics] = field(repr=False, default_factory=list)

    def pooled(self, quantity: str) -> Pooled:
        """The pooled diagnostics of `reward` or `length`."""
        pooled: Pooled = getattr(self, quantity)
        return pooled

    def to_json(self, *, per_prompt: bool = False) -> dict[str, Any]:
        """Pooled values by quantity (and the prompts' with `per_prompt`); NaN/inf as None."""
        out: dict[str, Any] = {
            "burn_in": self.burn_in,
            "rhat_threshold": RHAT_THRESHOLD,
            **{q: self.pooled(q).to_json() for q in QUANTITIES},
        }
        if per_prompt:
            out["prompts"] = [p.to_json() for p in self.prompts]
        return out


def _num(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _diag_json(d: Diagnostics) -> dict[str, Any]:
    return {"rhat": _num(d.rhat), "ess_bulk": _num(d.ess_bulk), "ess_tail": _num(d.ess_tail)}


class _StateWalk:
    """One chain's state reward and length after each step, from its proposals in step order."""

    def __init__(self) -> None:
        self.reward: list[float] = []
        self.length: list[float] = []
        self.broken = False

    def add(self, step: int, accepted: bool, reward: float | None, length: int) -> None:
        if self.broken or step != len(self.reward):
            self.broken = True  # a gap: keep the contiguous prefix only
            return
        if accepted or step == 0:
            self.reward.append(math.nan if reward is None else float(reward))
            self.length.append(float(length))
        else:  # rejected: the state stays
            self.reward.append(self.reward[-1])
            self.length.append(self.length[-1])


def state_traces(
    sessions: Sessions, run_id: int
) -> Iterator[tuple[int, list[list[float]], list[list[float]]]]:
    """Per prompt (in prompt order): (prompt index, chains' state rewards, state lengths).

    Each list holds one list per chain (in chain order) of its state after steps 0, 1, ...;
    the chains of a prompt may differ in length while the run is in progress. Streams one
    ordered query, so memory holds one prompt at a time.
    """
    q = (
        select(
            Prompt.prompt_index,
            Proposal.chain_id,
            Proposal.step,
            Proposal.accepted,
            Proposal.reward,
            Proposal.response_len,
        )
        .select_from(Proposal)
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .where(Proposal.run_id == run_id)
        .order_by(Prompt.prompt_index, Chain.chain_index, Proposal.step)
    )
    prompt: int | None = None
    walks: dict[int, _StateWalk] = {}

    def done() -> tuple[int, list[list[float]], list[list[float]]]:
        assert prompt is not None
        chains = [w for w in walks.values() if w.reward]
        return prompt, [w.reward for w in chains], [w.length for w in chains]

    with sessions() as s:
        for part in s.execute(q.execution_options(yield_per=STREAM_BATCH)).partitions():
            for prompt_index, chain_id, step, accepted, reward, length in part:
                if prompt_index != prompt:
                    if prompt is not None:
                        yield done()
                    prompt, walks = prompt_index, {}
                walk = walks.get(chain_id)
                if walk is None:
                    walk = walks[chain_id] = _StateWalk()
                walk.add(step, bool(accepted), reward, int(length))
    if prompt is not None:
        yield done()


def _draws(traces: list[list[float]], burn_in: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The (chains, draws) array: every chain cut to the shortest, less the burn-in."""
    n = min(len(t) for t in traces)
    return np.array([t[burn_in:n] for t in traces], dtype=np.float64).reshape(len(traces), -1)


def run_diagnostics(sessions: Sessions, run_id: int, *, burn_in: int = 0) -> RunDiagnostics:
    """R-hat and bulk/tail ESS of the states' reward and length, per prompt and pooled."""
    prompts = []
    for prompt_index, rewards, lengths in state_traces(sessions, run_id):
        if not rewards:
            continue
        reward, length = _draws(rewards, burn_in), _draws(lengths, burn_in)
        prompts.append(
            PromptDiagnostics(
                prompt_index=prompt_index,
                chains=reward.shape[0],
                draws=reward.shape[1],
                reward=diagnose(reward),
                length=diagnose(length),
            )
        )
    return RunDiagnostics(
        run_id=run_id,
        burn_in=burn_in,
        reward=Pooled.of([p.reward for p in prompts]),
        length=Pooled.of([p.length for p in prompts]),
        prompts=prompts,
    )


__all__ = [
    "QUANTITIES",
    "RHAT_THRESHOLD",
    "Pooled",
    "PromptDiagnostics",
    "RunDiagnostics",
    "run_diagnostics",
    "state_traces",
]
