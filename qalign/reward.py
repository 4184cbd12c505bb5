"""Seed-compatible rewards: `from qalign.reward import RemoteReward, RewardMix, ...`.

Every reward here is also an async `RewardModel` (`start` / `score` / `close`), which is what the
sampler calls; `evaluate` is the seed's synchronous face over `score`. A seed-style subclass that
only overrides `evaluate(conversations, **kwargs)` works too: it is run in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from qalign.clients import HttpSettings, make_reward
from qalign.clients.base import Conversation, RewardModel, score_with_tokens
from qalign.clients.composite import ConstantScore, LMLogLikelihood, Term, WeightedSum
from qalign.clients.errors import PromptTooLongError
from qalign.model import RemoteVLLM
from qalign.sampling.loop import run_sync

_NEITHER = "{} implements neither score() nor evaluate()"


class Reward:
    """Base class of every reward: a name and `evaluate(conversations) -> list[float]`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model = name  # the `RewardModel` protocol's name attribute

    def get_name(self) -> str:
        """The name with characters unsafe in file names replaced, as the seed does."""
        return self.name.replace("/", "-").replace(".", "++")

    def evaluate(
        self, conversations: Sequence[Conversation], use_tqdm: bool = False
    ) -> list[float]:
        """Rewards of whole conversations (each ending with the assistant reply).

        Args:
            use_tqdm: accepted for compatibility; scoring shows no progress bar.
        """
        del use_tqdm
        if type(self).score is Reward.score:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither score nor evaluate"
            )
        return run_sync(self.score(list(conversations)))

    async def start(self) -> None:
        return None

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        if type(self).evaluate is Reward.evaluate:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither score nor evaluate"
            )
        return list(await asyncio.to_thread(self.evaluate, list(conversations)))

    async def close(self) -> None:
        return None

    def set_context(self, *args: object) -> None:
        """Kept for the seed API; rewards here need no extra context."""
        del args

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class ConstantReward(Reward):
    """The same reward for every response (QAlign then samples the LM itself)."""

    def __init__(self, reward: float) -> None:
        super().__init__(f"constant:{reward}")
        self.reward = float(reward)
        self._impl = ConstantScore(self.reward)

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return await self._impl.score(conversations)


class BackwardReward(Reward):
    """The negation of another reward."""

    def __init__(self, model: Reward) -> None:
        super().__init__(f"backward:{model.get_name()}")
        self.model_reward = model

    async def start(self) -> None:
        await self.model_reward.start()

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return [-x for x in await self.model_reward.score(conversations)]


class RewardMix(Reward):
    """Σ_k w_k · r_k: several rewards, weighted (all weights 1 when not given)."""

    def __init__(self, rewards: Sequence[Reward], mixing_weights: Sequence[float] | None = None):
        rewards = list(rewards)
        weights = [1.0] * len(rewards) if mixing_weights is None else list(mixing_weights)
        if not rewards:
            raise ValueError("RewardMix needs at least one reward")
        if len(weights) != len(rewards):
            raise ValueError(
                f"RewardMix got {len(rewards)} rewards and {len(weights)} mixing weights"
            )
        super().__init__(f"mix:{','.join(r.get_name() for r in rewards)}")
        self.rewards = rewards
        self.mixing_weights = [float(w) for w in weights]
        self._sum = WeightedSum(
            [
                Term(f"{k}:{r.get_name()}", w, r)
                for k, (r, w) in enumerate(zip(rewards, self.mixing_weights, strict=True))
            ]
        )

    async def start(self) -> None:
        await self._sum.start()

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return await self._sum.score(conversations)


class RewardStatic(Reward):
    """A reward computed by a Python function of a list of conversations."""

    def __init__(self, reward_func: Callable[[list[Conversation]], Sequence[float]]) -> None:
        super().__init__(f"static:{getattr(reward_func, '__name__', 'function')}")
        self.reward_func = reward_func

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        values = await asyncio.to_thread(self.reward_func, list(conversations))
        out = [float(v) for v in values]
        if len(out) != len(conversations):
            raise ValueError(
                f"{self.name} returned {len(out)} rewards for {len(conversations)} conversations"
            )
        return out


class RewardSum(RewardMix):
    """The unweighted sum of several reward functions."""

    def __init__(self, reward_funcs: Sequence[Callable[[list[Conversation]], Sequence[float]]]):
        super().__init__([RewardStatic(f) for f in reward_funcs])


class RemoteReward(Reward):
    """A reward-model server scoring conversations, as in the seed package.

    Args:
        server_url: base URL, or several comma-separated URLs of replicas.
        model_path: the served reward model name.
        max_retries: attempts per request before giving up.
        polling_interval: accepted for the seed API; retries back off exponentially instead.
        timeout: total seconds allowed for one HTTP request.
        server_format: "vllm" (/classify, raw logits), "vllm-pooling", "sglang" (native
            /classify) or "auto"/None (detect from the server; the default).
        max_concurrent_requests: scoring requests in flight at once.
        max_prompt_length: conversations the reward model reads as more tokens than this raise
            `PromptTooLongError` (the seed cut the reply instead, changing what is scored);
            None (the default) sets no limit beyond the server's context.
        batch_size: conversations per scoring request.
    """

    def __init__(
        self,
        server_url: str,
        model_path: str,
        max_retries: int = 50,
        polling_interval: float = 0.5,
        timeout: float = 300,
        server_format: str | None = "auto",
        max_concurrent_requests: int = 1024,
        max_prompt_length: int | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(f"rm:{model_path}")
        if max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
        self.server_url = server_url.rstrip("/")
        self.model_path = model_path
        self.max_retries = max_retries
        self.polling_interval = polling_interval
        self.timeout = timeout
        self.batch_size = batch_size
        self.server_format = server_format or "auto"
        self.max_concurrent_requests = max_concurrent_requests
        self.max_prompt_length = max_prompt_length
        settings = HttpSettings(total_timeout=timeout, max_retries=max_retries)
        urls = [u.strip() for u in server_url.split(",") if u.strip()]
        self.reward: RewardModel = make_reward(
            self.server_format, urls, model_path, settings=settings, batch_size=batch_size
        )
        self._limit: asyncio.Semaphore | None = None
        run_sync(self.reward.start())

    def get_name(self) -> str:
        return self.name.replace("/", "-").split(".")[0]

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        if self._limit is None:  # created on the loop that uses it
            self._limit = asyncio.Semaphore(self.max_concurrent_requests)
        async with self._limit:
            scores, counts = await score_with_tokens(self.reward, conversations)
        if self.max_prompt_length is not None:
            for n in counts:
                if n is not None and n > self.max_prompt_length:
                    raise PromptTooLongError(
                        f"a scored conversation is {n} tokens, over max_prompt_length="
                        f"{self.max_prompt_length} of {self.model_path!r}"
                    )
        return scores

    async def score_with_tokens(
        self, conversations: Sequence[Conversation]
    ) -> tuple[list[float], list[int | None]]:
        """Rewards and the tokens the reward model read (what the step function records)."""
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.max_concurrent_requests)
        async with self._limit:
            return await score_with_tokens(self.reward, conversations)


class RemoteLMReward(Reward):
    """log p_LM of the reply (or, with `full_logprobs`, of the whole conversation) under a
    served LM, read from vLLM's prompt log-probs.

    Args:
        server_url: the LM server (vLLM).
        model_path: the served LM name.
        full_logprobs: score every token of the templated conversation, not only the reply's.
        **model_kwargs: passed on to `RemoteVLLM` (which refuses the ones it does not know).
    """

    def __init__(
        self, server_url: str, model_path: str, full_logprobs: bool = False, **model_kwargs: object
    ) -> None:
        super().__init__(f"logprobs:{model_path.replace('.', '')}")
        self.full_logprobs = full_logprobs
        # Scoring generates nothing: the length budgets only matter when given explicitly (a
        # conversation longer than the server's context is refused by the request itself).
        model_kwargs.setdefault("max_new_tokens", 1)
        model_kwargs.setdefault("max_prompt_length", 1)
        self.model_client = RemoteVLLM(
            server_url=server_url,
            model_path=model_path,
            track_logprobs=True,
            **model_kwargs,  # type: ignore[arg-type]
        )
        self._impl = LMLogLikelihood(
            self.model_client.prompt_scorer(), full_conversation=full_logprobs
        )

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return await self._impl.score(conversations)


class PIReward(Reward):
    """r(x, y) + beta · log p_ref(y | x): a reward plus a reference LM's log-likelihood."""

    def __init__(self, ref: RemoteLMReward, reward: Reward, beta: float = 1.0) -> None:
        super().__init__(f"pi:{ref.get_name()}:{reward.get_name()}")
        self.ref = ref
        self.reward = reward
        self.beta = float(beta)
        self._sum = WeightedSum([Term("reward", 1.0, reward), Term("ref", self.beta, ref)])

    async def start(self) -> None:
        await self._sum.start()

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return await self._sum.score(conversations)


__all__ = [
    "BackwardReward",
    "ConstantReward",
    "PIReward",
    "RemoteLMReward",
    "RemoteReward",
    "Reward",
    "RewardMix",
    "RewardStatic",
    "RewardSum",
]
