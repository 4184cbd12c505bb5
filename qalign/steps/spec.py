"""A run's settings, typed and frozen: parsed once per run, not once per step.

`runs.config` stores `RunSpec.to_config()` (plain JSON, queried by the README's SQL and the
analysis code); the step service turns it back into a `RunSpec` with `from_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qalign.clients.base import SamplingParams
from qalign.clients.spec import GeneratorSpec, RewardSpec
from qalign.core import KernelConfig, kernel_config
from qalign.core.stopping import StopRule


@dataclass(frozen=True)
class ExecutionSpec:
    """How a run's steps are executed (the sweep's `execution` section); not part of its
    identity, so a rerun of `qalign run` or `qalign sweep create` may change it."""

    concurrency: int = 64  # steps of the sweep in flight per process
    max_attempts: int = 5  # failed attempts of a step before its chain is `failed`
    stall_timeout: float = 600.0  # seconds a step may take; the reaper's idle threshold

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ExecutionSpec:
        # Runs stored before the section was copied into each run get the defaults.
        if not cfg:
            return cls()
        return cls(
            concurrency=int(cfg.get("concurrency", cls.concurrency)),
            max_attempts=int(cfg.get("max_attempts", cls.max_attempts)),
            stall_timeout=float(cfg.get("stall_timeout", cls.stall_timeout)),
        )


@dataclass(frozen=True)
class SmcSpec:
    """An SMC run's particle settings (the sweep's `smc` section); particles are its chains."""

    block_tokens: int
    ess_threshold: float = 0.5  # resample when ESS < ess_threshold x particles

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SmcSpec | None:
        if not cfg:
            return None
        return cls(int(cfg["block_tokens"]), float(cfg.get("ess_threshold", 0.5)))


@dataclass(frozen=True)
class RunSpec:
    """One grid point of a sweep: everything its chains need to take steps."""

    grid_index: int
    name: str
    method: str
    beta: float | None
    temperature: float
    steps: int
    chains_per_prompt: int
    seed: int
    index: str
    clamp: float
    max_new_tokens: int
    max_prompt_length: int
    generator: GeneratorSpec
    reward: RewardSpec | None
    execution: ExecutionSpec = ExecutionSpec()
    stop_when: StopRule | None = None  # retire a prompt's chains once they converged
    smc: SmcSpec | None = None  # `method: smc` only
    alpha: float | None = None  # power sampling's exponent (method `power` only)
    kernel: KernelConfig = field(init=False, repr=False, compare=False)
    sampling: SamplingParams = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kernel = kernel_config(
            "qalign" if self.method == "smc" else self.method,  # SMC targets QAlign's law
            beta=self.beta,
            max_new_tokens=self.max_new_tokens,
            index=self.index,
            clamp=self.clamp,
            alpha=self.alpha,
        )
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "sampling", SamplingParams(temperature=self.temperature))

    @property
    def generator_model(self) -> str:
        return self.generator.model

    @property
    def reward_model(self) -> str | None:
        return self.reward.model if self.reward is not None else None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RunSpec:
        """Parse a stored `runs.config`."""
        reward = cfg.get("reward")
        return cls(
            grid_index=int(cfg["grid_index"]),
            name=str(cfg["name"]),
            method=str(cfg["method"]),
            beta=None if cfg.get("beta") is None else float(cfg["beta"]),
            temperature=float(cfg["temperature"]),
            steps=int(cfg["steps"]),
            chains_per_prompt=int(cfg["chains_per_prompt"]),
            seed=int(cfg["seed"]),
            index=str(cfg["index"]),
            clamp=float(cfg["clamp"]),
            max_new_tokens=int(cfg["max_new_tokens"]),
            max_prompt_length=int(cfg["max_prompt_length"]),
            generator=GeneratorSpec.from_config(cfg["generator"]),
            reward=RewardSpec.from_config(reward) if reward else None,
            execution=ExecutionSpec.from_config(cfg.get("execution")),
            stop_when=StopRule.from_config(cfg.get("stop_when")),
            smc=SmcSpec.from_config(cfg.get("smc")),
            alpha=None if cfg.get("alpha") is None else float(cfg["alpha"]),
        )

    def to_config(self) -> dict[str, Any]:
        """The JSON stored in `runs.config` (the layout the README's SQL reads)."""
        gen = self.generator
        rm = self.reward
        out: dict[str, Any] = {
            "grid_index": self.grid_index,
            "name": self.name,
            "method": self.method,
            "beta": self.beta,
            "temperature": self.temperature,
            "steps": self.steps,
            "generator_model": gen.model,
            "reward_model": self.reward_model,
            "chains_per_prompt": self.chains_per_prompt,
            "seed": self.seed,
            "index": self.index,
            "clamp": self.clamp,
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_length": self.max_prompt_length,
            "generator": {
                "backend": gen.backend,
                "urls": list(gen.urls),
                "model": gen.model,
                "timeout": gen.timeout,
                "max_retries": gen.max_retries,
                "api_key_env": gen.api_key_env,
                "api_key_file": gen.api_key_file,
                "vocab_size": gen.vocab_size,
                "template_url": None if gen.template_url is None else list(gen.template_url),
            },
            "reward": None if rm is None else rm.to_config(),
            "execution": {
                "concurrency": self.execution.concurrency,
                "max_attempts": self.execution.max_attempts,
                "stall_timeout": self.execution.stall_timeout,
            },
        }
        if self.stop_when is not None:  # absent otherwise: runs.config as before the key
            out["stop_when"] = self.stop_when.to_config()
        if self.smc is not None:
            out["smc"] = {"block_tokens": self.smc.block_tokens,
                          "ess_threshold": self.smc.ess_threshold}  # fmt: skip
        if self.alpha is not None:  # absent otherwise, likewise
            out["alpha"] = self.alpha
        return out
