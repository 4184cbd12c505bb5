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
class RewardTermSpec:
    """One weighted term of a composite reward: a reward-model server (`model`), an LM's
    log-likelihood of the reply or conversation (`lm_logprob`, a vLLM generator), or a constant."""

    name: str
    weight: float
    kind: str
    server: RewardSpec | None = None  # kind "model"
    lm: GeneratorSpec | None = None  # kind "lm_logprob"
    full_conversation: bool = False
    value: float = 0.0  # kind "constant"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RewardTermSpec:
        kind = str(cfg.get("kind", "model"))
        name, weight = str(cfg["name"]), float(cfg.get("weight", 1.0))
        if kind == "constant":
            return cls(name, weight, kind, value=float(cfg["value"]))
        if kind == "lm_logprob":
            lm = GeneratorSpec.from_config({**cfg, "backend": "vllm"})
            full = cfg.get("scope") == "conversation"
            return cls(name, weight, kind, lm=lm, full_conversation=full)
        return cls(name, weight, kind, server=RewardSpec.from_config(cfg))

    @property
    def sections(self) -> tuple[GeneratorSpec | RewardSpec, ...]:
        found = self.server if self.server is not None else self.lm
        return () if found is None else (found,)

    def to_config(self) -> dict[str, Any]:
        """The term as a config mapping (`from_config` reads it back)."""
        out: dict[str, Any] = {"name": self.name, "weight": self.weight, "kind": self.kind}
        if self.kind == "constant":
            return {**out, "value": self.value}
        if self.lm is not None:
            lm = self.lm
            return {
                **out,
                "scope": "conversation" if self.full_conversation else "reply",
                "urls": list(lm.urls),
                "model": lm.model,
                "timeout": lm.timeout,
                "max_retries": lm.max_retries,
                "api_key_env": lm.api_key_env,
                "api_key_file": lm.api_key_file,
            }
        assert self.server is not None
        return {**out, **self.server.to_config()}


@dataclass(frozen=True)
class RewardSpec:
    """A reward section of a sweep config: one reward-model server, or weighted `terms`."""

    format: str
    urls: tuple[str, ...]
    model: str
    timeout: float = 300.0
    max_retries: int = 8
    batch_size: int = 32
    api_key_env: str | None = None
    api_key_file: str | None = None
    terms: tuple[RewardTermSpec, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RewardSpec:
        raw_terms = cfg.get("terms")
        if raw_terms:
            terms = tuple(RewardTermSpec.from_config(t) for t in raw_terms)
            return cls(
                format="composite",
                urls=tuple(u for t in terms for s in t.sections for u in s.urls),
                model=" + ".join(f"{t.weight:g}*{t.name}" for t in terms),
                timeout=max((s.timeout for t in terms for s in t.sections), default=300.0),
                max_retries=max((s.max_retries for t in terms for s in t.sections), default=8),
                terms=terms,
            )
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

    def to_config(self) -> dict[str, Any]:
        """The section as stored in `runs.config` (`from_config` reads it back)."""
        if self.terms:
            return {
                "format": self.format,
                "urls": list(self.urls),
                "model": self.model,
                "terms": [t.to_config() for t in self.terms],
            }
        return {
            "format": self.format,
            "urls": list(self.urls),
            "model": self.model,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "batch_size": self.batch_size,
            "api_key_env": self.api_key_env,
            "api_key_file": self.api_key_file,
        }

    def sections(self) -> tuple[GeneratorSpec | RewardSpec, ...]:
        """The server sections this reward talks to (itself, or its terms' servers)."""
        if not self.terms:
            return (self,)
        return tuple(s for t in self.terms for s in t.sections)
