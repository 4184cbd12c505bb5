"""Seed-compatible sampler: `from qalign.base import QAlign`.

`QAlign(model, reward, beta).run(conversations, steps)` runs one independent chain per
conversation through the shared step function and returns every proposal, as the seed did.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qalign.clients.base import Conversation
from qalign.core import kernel_config
from qalign.model import RemoteVLLM
from qalign.reward import RemoteReward
from qalign.sampling.ancestral import ancestral_records, chain_specs, progress
from qalign.sampling.local import run_chains
from qalign.sampling.loop import run_sync
from qalign.sampling.step import ChainSpec, StepRecord


@dataclass
class Output:
    """What `QAlign.run` returns.

    Attributes:
        state_path: per conversation, steps + 1 records (t = 0 is the initial sample) with the
            proposal of that step: `t`, `reward`, `completion` (token ids), `text`, `index` (the
            cut), `accept`, `criterion` (the acceptance probability), plus `finish`, `log_a` and
            `reject_reason`.
        texts: per conversation, {"input": conversation, "outputs": chain trajectory}, where a
            rejected step repeats the last accepted text.
        seed: the run seed; passing it again reproduces every decision.
    """

    state_path: list[list[dict[str, Any]]]
    texts: list[dict[str, Any]]
    seed: int
    records: list[list[StepRecord]] = field(default_factory=list, repr=False)


def _record_dict(r: StepRecord) -> dict[str, Any]:
    return {
        "t": r.step,
        "reward": r.reward,
        "completion": list(r.proposal.tokens if r.proposal is not None else r.new_tokens),
        "text": r.proposal_text,
        "index": r.cut,
        "accept": r.accepted,
        "criterion": r.decision.alpha,
        "log_a": r.decision.log_a,
        "finish": r.finish.value,
        "reject_reason": r.decision.reason.value if r.decision.reason else None,
    }


class QAlign:
    """Metropolis-Hastings over responses with the LM as proposal (QAlign / QUEST).

    Args:
        model: a `RemoteVLLM` (the generator).
        reward: a `RemoteReward`.
        beta: reward temperature of the target p_LM(y|x)·exp(r/beta).
        logratio_clamp: |log A| is clamped to this before exponentiation.
        method: "qalign" (default) or "quest" (target ∝ exp(r/beta); needs logprobs).
        index: cut distribution: "uniform", "independent" or "block:N".
        seed: run seed; None draws a fresh one (recorded in the output).
    """

    def __init__(
        self,
        model: RemoteVLLM,
        reward: RemoteReward,
        beta: float = 0.1,
        logratio_clamp: float = 20,
        method: str = "qalign",
        index: str = "uniform",
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.rm = reward
        self.beta = beta
        self.logratio_clamp = logratio_clamp
        self.seed = seed
        if method not in ("qalign", "quest"):
            raise ValueError(f"method must be 'qalign' or 'quest', got {method!r}")
        self.kernel = kernel_config(
            method,
            beta=beta,
            max_new_tokens=model.max_new_tokens,
            index=index,
            clamp=logratio_clamp,
        )

    def run(
        self,
        conversations: Sequence[Conversation],
        steps: int = 100,
        use_tqdm: bool = False,
        **_: Any,
    ) -> Output:
        """Run one chain of `steps` MCMC steps per conversation; chains advance independently."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        conversations = list(conversations)
        seed = secrets.randbits(31) if self.seed is None else self.seed
        bar = progress(len(conversations) * (steps + 1), use_tqdm, "QAlign")

        def tick(_spec: ChainSpec, _rec: StepRecord) -> None:
            if bar is not None:
                bar.update(1)

        async def _run() -> list[list[StepRecord]]:
            specs = await chain_specs(self.model, conversations, self.kernel, seed)
            return await run_chains(
                specs,
                steps,
                self.model.generator,
                self.rm.reward,
                concurrency=self.model.max_concurrent_requests,
                on_record=tick,
            )

        try:
            records = run_sync(_run())
        finally:
            if bar is not None:
                bar.close()
        return Output(
            state_path=[[_record_dict(r) for r in recs] for recs in records],
            texts=[
                {"input": conv, "outputs": [r.state_text for r in recs]}
                for conv, recs in zip(conversations, records, strict=True)
            ],
            seed=seed,
            records=records,
        )

    def ancestral(
        self, conversations: Sequence[Conversation], n: int = 1, use_tqdm: bool = False
    ) -> list[list[dict[str, Any]]]:
        """n independent scored samples per conversation: `completion`, `text`, `reward`."""
        records = ancestral_records(
            self.model, self.rm.reward, conversations, n, seed=self.seed, use_tqdm=use_tqdm
        )
        return [
            [
                {"completion": list(r.state.tokens), "text": r.state_text, "reward": r.reward}
                for r in recs
            ]
            for recs in records
        ]
