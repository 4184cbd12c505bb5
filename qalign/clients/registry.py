"""One started client per distinct server spec, shared by every step of a process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from qalign.clients import make_generator, make_reward
from qalign.clients.base import Generator, RewardModel
from qalign.clients.cache import CachedReward
from qalign.clients.composite import ConstantScore, LMLogLikelihood, Term, WeightedSum
from qalign.clients.credentials import api_key
from qalign.clients.http import HttpSettings
from qalign.clients.spec import GeneratorSpec, RewardSpec
from qalign.clients.vllm import VLLMGenerator

C = TypeVar("C")


class _Borrowed(WeightedSum):
    """A composite over clients owned by the registry: closing it closes nothing."""

    def __init__(self, inner: WeightedSum) -> None:
        super().__init__(inner.terms)

    async def close(self) -> None:
        return None


def _http(spec: GeneratorSpec | RewardSpec) -> HttpSettings:
    # the key is read when the client is built, so a rotated key file takes effect on restart
    return HttpSettings(
        total_timeout=spec.timeout,
        max_retries=spec.max_retries,
        api_key=api_key(spec.api_key_env, spec.api_key_file),
    )


class ClientRegistry:
    """Builds, starts and keeps clients by spec; `close()` closes them all.

    Args:
        startup_timeout: the most seconds a new client waits for its server to become healthy;
            a spec waits at most its `timeout × max_retries` (the longest one request of it
            may take), so a server that is down fails its steps as a failing request would.
    """

    def __init__(self, startup_timeout: float = 600.0) -> None:
        self.startup_timeout = startup_timeout
        self._items: dict[GeneratorSpec | RewardSpec, Any] = {}
        self._locks: dict[GeneratorSpec | RewardSpec, asyncio.Lock] = {}

    async def _get(self, spec: GeneratorSpec | RewardSpec, build: Callable[[], C]) -> C:
        found = self._items.get(spec)
        if found is not None:
            return found  # type: ignore[no-any-return]
        async with self._locks.setdefault(spec, asyncio.Lock()):
            if spec not in self._items:
                client: Any = build()
                await client.start()
                self._items[spec] = client
        return self._items[spec]  # type: ignore[no-any-return]

    async def generator(self, spec: GeneratorSpec) -> Generator:
        def build() -> Generator:
            extra: dict[str, Any] = {}
            if spec.template_url is not None:
                extra["template_url"] = list(spec.template_url)
            return make_generator(
                spec.backend,
                list(spec.urls),
                spec.model,
                settings=_http(spec),
                startup_timeout=self._startup(spec),
                vocab_size=spec.vocab_size,
                **extra,
            )

        return await self._get(spec, build)

    async def reward(self, spec: RewardSpec) -> RewardModel:
        if spec.terms:
            return await self._composite(spec)

        def build() -> RewardModel:
            return CachedReward(
                make_reward(
                    spec.format,
                    list(spec.urls),
                    spec.model,
                    settings=_http(spec),
                    batch_size=spec.batch_size,
                    startup_timeout=self._startup(spec),
                )
            )

        return await self._get(spec, build)

    async def _composite(self, spec: RewardSpec) -> WeightedSum:
        """A weighted sum whose terms share this registry's clients (and reward caches)."""
        found = self._items.get(spec)
        if found is not None:
            return found  # type: ignore[no-any-return]
        terms = []
        for t in spec.terms:
            rm: RewardModel
            if t.server is not None:
                rm = await self.reward(t.server)
            elif t.lm is not None:
                lm = await self.generator(t.lm)
                if not isinstance(lm, VLLMGenerator):
                    raise TypeError(f"reward term {t.name!r}: lm_logprob needs a vLLM server")
                rm = LMLogLikelihood(lm, full_conversation=t.full_conversation)
            else:
                rm = ConstantScore(t.value, name=t.name)
            terms.append(Term(t.name, t.weight, rm))
        # no start/close of its own: its clients are the registry's, closed with it
        return self._items.setdefault(spec, _Borrowed(WeightedSum(terms)))  # type: ignore[no-any-return]

    def _startup(self, spec: GeneratorSpec | RewardSpec) -> float:
        return min(self.startup_timeout, spec.timeout * spec.max_retries)

    async def close(self) -> None:
        for client in self._items.values():
            await client.close()
        self._items.clear()
