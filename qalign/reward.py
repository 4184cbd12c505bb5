"""Seed-compatible reward wrapper: `from qalign.reward import RemoteReward`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qalign.clients import HttpSettings, make_reward
from qalign.clients.base import Conversation, RewardModel
from qalign.sampling.loop import run_sync


class RemoteReward:
    """A reward-model server scoring conversations, as in the seed package.

    Args:
        server_url: base URL, or several comma-separated URLs of replicas.
        model_path: the served reward model name.
        max_retries: attempts per request before giving up.
        polling_interval: kept for compatibility; retries back off exponentially instead.
        timeout: total seconds allowed for one HTTP request.
        batch_size: conversations per scoring request.
        server_format: "vllm" (/classify, raw logits), "vllm-pooling", "sglang" (native
            /classify) or "auto" (detect from the server; the default).
    """

    def __init__(
        self,
        server_url: str,
        model_path: str,
        max_retries: int = 50,
        polling_interval: float = 0.5,
        timeout: float = 300,
        batch_size: int = 64,
        server_format: str = "auto",
        **client_options: Any,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.model_path = model_path
        self.max_retries = max_retries
        self.polling_interval = polling_interval
        self.timeout = timeout
        self.batch_size = batch_size
        self.server_format = server_format
        self.name = f"rm:{model_path}"
        settings = HttpSettings(total_timeout=timeout, max_retries=max_retries)
        urls = [u.strip() for u in server_url.split(",") if u.strip()]
        self.reward: RewardModel = make_reward(
            server_format,
            urls,
            model_path,
            settings=settings,
            batch_size=batch_size,
            **client_options,
        )
        run_sync(self.reward.start())

    def get_name(self) -> str:
        return self.name.replace("/", "-").split(".")[0]

    def evaluate(self, conversations: Sequence[Conversation], **_: Any) -> list[float]:
        """Raw rewards of whole conversations (each ending with the assistant reply)."""
        return run_sync(self.reward.score(list(conversations)))

    def set_context(self, *_: Any, **__: Any) -> None:
        """Kept for compatibility with the seed API; rewards need no extra context here."""
