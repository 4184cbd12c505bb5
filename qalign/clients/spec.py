"""Which server a client talks to and how: frozen, hashable, parsed once per run.

A spec is the key of `ClientRegistry`: equal specs share one started client per process. Where
an API key comes from is part of a spec; the key itself never is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GeneratorSpec:
    """A generator section of a sweep config (one model of its grid)."""

    backend: str
    urls: tuple[str, ...]
    model: str
    timeout: float = 300.0
    max_retries: int = 8
    api_key_env: str | None = None
    api_key_file: str | None = None
    vocab_size: int | None = None
    template_url: tuple[str, ...] | None = None  # SGLang: a vLLM-compatible /tokenize server

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> GeneratorSpec:
        template = cfg.get("template_url")
        return cls(
            backend=str(cfg["backend"]),
            urls=tuple(cfg["urls"]),
            model=str(cfg["model"]),
            timeout=float(cfg["timeout"]),
            max_retries=int(cfg["max_retries"]),
            api_key_env=cfg.get("api_key_env"),
            api_key_file=cfg.get("api_key_file"),
            vocab_size=cfg.get("vocab_size"),
            template_url=None if template is None else tuple(template),
        )


@dataclass(frozen=True)
class RewardSpec:
    """A reward section of a sweep config."""

    format: str
    urls: tuple[str, ...]
    model: str
    timeout: float = 300.0
    max_retries: int = 8
    batch_size: int = 32
    api_key_env: str | None = None
    api_key_file: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RewardSpec:
        return cls(
            format=str(cfg["format"]),
            urls=tuple(cfg["urls"]),
            model=str(cfg["model"]),
            timeout=float(cfg["timeout"]),
            max_retries=int(cfg["max_retries"]),
            batch_size=int(cfg["batch_size"]),
            api_key_env=cfg.get("api_key_env"),
            api_key_file=cfg.get("api_key_file"),
        )
