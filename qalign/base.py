"""Seed-compatible sampler: `from qalign.base import QAlign` (or `from qalign import QAlign`).

`QAlign(model, reward, beta).run(conversations, steps)` runs one independent chain per
conversation through the shared step function and returns every proposal, as the seed did.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qalign.clients.base import Conversation, RewardModel
from qalign.core import Finish, KernelConfig, State, kernel_config
from qalign.model import RemoteVLLM
from qalign.sampling.ancestral import ancestral_records, chain_specs
from qalign.sampling.local import run_chain
from qalign.sampling.loop import run_sync
from qalign.sampling.step import ChainSpec, StepRecord, reward_conversation, warm_start_step

Callback = Callable[["ChainStates"], object]
WarmStart = Mapping[str, Any] | str | Sequence[int]


@dataclass
class ChainStates:
    """The current state of every chain at step `t` (what callbacks receive; `QAlign.State`).

    Each list has one entry per conversation: `reward`, `completion` (token ids), `text`,
    `index` (the cut of the move that produced the state; 0 for the initial sample) and `scores`
    (the sum of the state's token log-probs when they were requested, else 0.0).
    """

    reward: list[float]
    completion: list[list[int]]
    text: list[str]
    index: list[int]
    t: int = 0
    scores: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "reward": self.reward,
            "completion": self.completion,
            "text": self.text,
            "t": self.t,
            "index": self.index,
            "scores": self.scores,
        }


@dataclass
class RunOutput:
    """What `QAlign.run` returns (`QAlign.Output`).

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
    seed: int = 0
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


class _EvaluateOnly:
    """A seed-style reward object with only a synchronous `evaluate`, as a `RewardModel`."""

    def __init__(self, reward: Any) -> None:
        self.inner = reward
        self.model = str(getattr(reward, "name", type(reward).__name__))

    async def start(self) -> None:
        return None

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return [float(x) for x in await asyncio.to_thread(self.inner.evaluate, list(conversations))]

    async def close(self) -> None:
        return None


def _as_reward_model(reward: Any) -> RewardModel:
    if callable(getattr(reward, "score", None)):
        return reward  # type: ignore[no-any-return]
    if callable(getattr(reward, "evaluate", None)):
        return _EvaluateOnly(reward)
    raise TypeError(f"reward must be a qalign.reward.Reward (or have evaluate()), got {reward!r}")


class _Lockstep:
    """Calls the callbacks with every chain's state at t = 0, 1, ... in order.

    Chains advance independently; the states of step t are handed over once the slowest chain
    has finished step t (no chain waits for the callbacks' turn).
    """

    def __init__(self, n: int, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)
        self.pending: list[dict[int, StepRecord]] = [{} for _ in range(n)]
        self.index = [0] * n
        self.next_t = 0

    def add(self, chain: int, rec: StepRecord) -> None:
        if not self.callbacks:
            return
        self.pending[chain][rec.step] = rec
        while self.pending and all(self.next_t in p for p in self.pending):
            recs = [p.pop(self.next_t) for p in self.pending]
            for k, r in enumerate(recs):
                if r.accepted:
                    self.index[k] = r.cut
            snapshot = ChainStates(
                reward=[r.state.reward for r in recs],
                completion=[list(r.state.tokens) for r in recs],
                text=[r.state_text for r in recs],
                index=list(self.index),
                t=self.next_t,
                scores=[
                    math.fsum(r.state.logprobs) if r.state.logprobs is not None else 0.0
                    for r in recs
                ],
            )
            for cb in self.callbacks:
                cb(snapshot)
            self.next_t += 1


class QAlign:
    """Metropolis-Hastings over responses with the LM as proposal (QAlign / QUEST).

    Args:
        model: a `RemoteVLLM` (the generator).
        reward: a `qalign.reward.Reward` (`RemoteReward`, `RewardMix`, `PIReward`, ...).
        beta: reward temperature of the target p_LM(y|x)·exp(r/beta).
        logratio_clamp: |log A| is clamped to this before exponentiation.
        method: "qalign" (default) or "quest" (target ∝ exp(r/beta); needs logprobs).
        index: cut distribution: "uniform", "independent" or "block:N".
        seed: run seed; None draws a fresh one (recorded in the output).
    """

    State = ChainStates
    Output = RunOutput

    def __init__(
        self,
        model: RemoteVLLM,
        reward: Any,
        beta: float = 0.1,
        logratio_clamp: float = 20,
        *,
        method: str = "qalign",
        index: str = "uniform",
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.rm = reward
        self.reward_model = _as_reward_model(reward)
        self.beta = beta
        self.logratio_clamp = logratio_clamp
        self.seed = seed
        if method not in ("qalign", "quest"):
            raise ValueError(f"method must be 'qalign' or 'quest', got {method!r}")
        self.kernel: KernelConfig = kernel_config(
            method,
            beta=beta,
            max_new_tokens=model.max_new_tokens,
            index=index,
            clamp=logratio_clamp,
        )

    # ---- warm starts ----------------------------------------------------------------------
    async def _warm_record(self, spec: ChainSpec, entry: WarmStart) -> StepRecord:
        """Step 0 from a given completion (text or token ids) and, when given, its reward."""
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"completion", "reward", "finish", "logprobs", "scores"}
            if unknown:
                raise TypeError(f"warm_start entry has unknown keys: {sorted(unknown)}")
            if "completion" not in entry:
                raise ValueError("a warm_start entry needs a 'completion' (text or token ids)")
            completion, reward = entry["completion"], entry.get("reward")
            finish_name, logprobs = entry.get("finish"), entry.get("logprobs")
        else:
            completion, reward, finish_name, logprobs = entry, None, None, None
        gen = self.model.generator
        if isinstance(completion, str):
            # Text is all the user has: the server tokenizes it once, and the state carries no
            # stop token (a chain started from token ids keeps the exact ids).
            tokens = tuple(await self.model._token_ids_of(completion))
            finish = Finish(finish_name or "length")
        else:
            tokens = tuple(int(t) for t in completion)
            finish = Finish(finish_name or "stop")
        if not tokens or len(tokens) > self.kernel.max_new_tokens:
            raise ValueError(
                f"warm_start completion of chain {spec.key} has {len(tokens)} tokens; it needs "
                f"1..max_new_tokens={self.kernel.max_new_tokens}"
            )
        lps = None if logprobs is None else tuple(float(x) for x in logprobs)
        if self.kernel.needs_logprobs and lps is None:
            raise ValueError("QUEST chains need per-token 'logprobs' in each warm_start entry")
        state = State(tokens=tokens, reward=math.nan, finish=finish, logprobs=lps)
        text = (
            completion if isinstance(completion, str) else await gen.detokenize(state.text_tokens)
        )
        if reward is None:
            (score,) = await self.reward_model.score([reward_conversation(spec.messages, text)])
            reward = score
        state = State(tokens=tokens, reward=float(reward), finish=finish, logprobs=lps)
        return warm_start_step(state, text)

    # ---- running --------------------------------------------------------------------------
    async def _records(
        self,
        conversations: list[Conversation],
        steps: int,
        seed: int,
        warm_start: Sequence[WarmStart] | None,
        on_record: Callable[[int, StepRecord], None],
        batches: tuple[int, int] | None = None,
    ) -> list[list[StepRecord]]:
        """Every chain's records; `batches=(size, workers)` runs at most `workers` batches of
        `size` chains at once (chain keys, hence results, do not depend on the batching)."""
        specs = await chain_specs(
            self.model,
            conversations,
            self.kernel,
            seed,
            track_logprobs=self.model.track_logprobs,
        )
        limiter = asyncio.Semaphore(self.model.max_concurrent_requests)

        def tick(spec: ChainSpec, rec: StepRecord) -> None:
            on_record(int(spec.key), rec)

        async def one(i: int) -> list[StepRecord]:
            history: list[StepRecord] = []
            if warm_start is not None:
                async with limiter:
                    history = [await self._warm_record(specs[i], warm_start[i])]
                on_record(i, history[0])
            return await run_chain(
                specs[i],
                steps,
                self.model.generator,
                self.reward_model,
                limiter=limiter,
                on_record=tick,
                history=history,
            )

        if batches is None:
            return list(await asyncio.gather(*(one(i) for i in range(len(specs)))))
        size, workers = batches
        gate = asyncio.Semaphore(workers)

        async def batch(start: int) -> list[list[StepRecord]]:
            async with gate:
                idx = range(start, min(start + size, len(specs)))
                return list(await asyncio.gather(*(one(i) for i in idx)))

        parts = await asyncio.gather(*(batch(s) for s in range(0, len(specs), size)))
        return [recs for part in parts for recs in part]

    def _run(
        self,
        conversations: Sequence[Conversation],
        steps: int,
        *,
        warm_start: Sequence[WarmStart] | None,
        use_tqdm: bool,
        callbacks: Sequence[Callback],
        tqdm_index: int,
        tqdm_total: int,
        batches: tuple[int, int] | None = None,
    ) -> RunOutput:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if tqdm_total < 1:
            raise ValueError(f"tqdm_total must be >= 1, got {tqdm_total}")
        conversations = list(conversations)
        if warm_start is not None and len(warm_start) != len(conversations):
            raise ValueError(
                f"warm_start has {len(warm_start)} entries for {len(conversations)} conversations"
            )
        seed = secrets.randbits(31) if self.seed is None else self.seed
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(
                total=len(conversations) * (steps + 1),
                desc=f"Chain {tqdm_index}",
                position=tqdm_index % tqdm_total,
                leave=True,
                unit="step",
            )
        lockstep = _Lockstep(len(conversations), callbacks)

        def on_record(chain: int, rec: StepRecord) -> None:
            if bar is not None:
                bar.update(1)
            lockstep.add(chain, rec)

        try:
            records = run_sync(
                self._records(conversations, steps, seed, warm_start, on_record, batches)
            )
        finally:
            if bar is not None:
                bar.close()
        return RunOutput(
            state_path=[[_record_dict(r) for r in recs] for recs in records],
            texts=[
                {"input": conv, "outputs": [r.state_text for r in recs]}
                for conv, recs in zip(conversations, records, strict=True)
            ],
            seed=seed,
            records=records,
        )

    def run(
        self,
        conversations: Sequence[Conversation],
        steps: int = 100,
        warm_start: Sequence[WarmStart] | None = None,
        use_tqdm: bool = False,
        callbacks: Sequence[Callback] = (),
        tqdm_index: int = 0,
        tqdm_total: int = 1,
    ) -> RunOutput:
        """Run one chain of `steps` MCMC steps per conversation; chains advance independently.

        Args:
            warm_start: one entry per conversation to start its chain from instead of an LM
                sample: {"completion": text or token ids, "reward": float (trusted as given;
                scored when missing), "finish": "stop" | "length", "logprobs": [...] (QUEST)},
                or just the text / token ids. Token ids are kept exactly and are taken to end
                with the stop token unless finish is "length"; text is tokenized once by the
                server and carries no stop token.
            callbacks: called with `QAlign.State` (every chain's current state) at t = 0 (the
                initial states) and after every step t, in order, once all chains have done t.
            tqdm_index, tqdm_total: the progress bar is "Chain {tqdm_index}" on line
                tqdm_index % tqdm_total (several runs in threads, as `run_pipelined` does).
        """
        return self._run(
            conversations,
            steps,
            warm_start=warm_start,
            use_tqdm=use_tqdm,
            callbacks=callbacks,
            tqdm_index=tqdm_index,
            tqdm_total=tqdm_total,
        )

    def run_pipelined(
        self,
        conversations: Sequence[Conversation],
        steps: int,
        workers: int = 0,
        use_tqdm: bool = False,
        batch_size: int = 16,
    ) -> list[tuple[Conversation, list[dict[str, Any]]]]:
        """`run` over many conversations, `workers` batches of `batch_size` chains at a time.

        `workers=0` runs every chain at once. Returns (conversation, state_path) pairs in input
        order; with the same seed the result does not depend on workers or batch_size.
        """
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        conversations = list(conversations)
        out = self._run(
            conversations,
            steps,
            warm_start=None,
            use_tqdm=use_tqdm,
            callbacks=(),
            tqdm_index=0,
            tqdm_total=1,
            batches=(batch_size, workers) if workers > 0 else None,
        )
        return list(zip(conversations, out.state_path, strict=True))

    def ancestral(
        self, conversations: Sequence[Conversation], n: int = 1, use_tqdm: bool = False
    ) -> list[list[dict[str, Any]]]:
        """n independent scored samples per conversation: `completion`, `text`, `reward`."""
        records = ancestral_records(
            self.model,
            self.reward_model,
            conversations,
            n,
            seed=self.seed,
            use_tqdm=use_tqdm,
        )
        return [
            [
                {"completion": list(r.state.tokens), "text": r.state_text, "reward": r.reward}
                for r in recs
            ]
            for recs in records
        ]

    def __str__(self) -> str:
        return f"QAlign(model={self.model}, reward={self.rm})"
