"""Sweep configuration (YAML): validated completely before anything is written.

A sweep config names the servers, the dataset and the method, and lists grid axes (beta, or
alpha for power sampling, temperature, steps, generator model); every combination becomes one run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.nodes import CollectionNode, MappingNode, Node

from qalign.clients.spec import GeneratorSpec, RewardSpec
from qalign.core import index_distribution
from qalign.core.smc import block_count
from qalign.core.stopping import DEFAULT_EVERY, DEFAULT_MIN_STEPS, StopRule
from qalign.steps.spec import ExecutionSpec, RunSpec, SmcSpec

DEFAULT_STEPS = 10


class ConfigError(ValueError):
    """A sweep config that cannot be used; the message names every bad key and its problem."""


class ConfigLimitError(ConfigError):
    """A config over one of the size limits of `LIMITS` (one line naming key, value, limit)."""


# Sizes past which a config is a mistake or an attack, refused before anything is allocated,
# written or contacted: a typo'd `chains_per_prompt: 10000000` would otherwise insert millions
# of rows, and ints past 2**31 overflow PostgreSQL's INTEGER columns mid-insert. Documented in
# the README's "Limits" table; keep the two in step.
LIMITS: dict[str, int] = {
    "steps": 1_000_000,
    "chains_per_prompt": 100_000,
    "max_new_tokens": 1_000_000,
    "max_prompt_length": 1_000_000,
    "generator.max_retries": 1_000,
    "reward.max_retries": 1_000,
    "reward.batch_size": 100_000,
    "execution.concurrency": 100_000,
    "execution.max_attempts": 1_000,
}
MAX_SWEEP_CHAINS = 10_000_000  # runs x prompts x chains_per_prompt: the sweep's chain rows
MAX_NAME_CHARS = 200  # sweep name, generator.model, reward.model (a run's name holds the model)
MAX_URL_CHARS = 300
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIAS_VALUES = 100_000
FINITE_KEYS = (
    "beta",
    "alpha",
    "temperature",
    "clamp",
    "generator.timeout",
    "reward.timeout",
    "execution.stall_timeout",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_http_urls(urls: list[str]) -> list[str]:
    for u in urls:
        if not re.match(r"^https?://[^/\s]+", u):
            raise ValueError(f"{u!r} is not an http(s) URL")
        # The config is stored in the database and printed by `sweep show`: no credentials in it.
        if "@" in u.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "a server URL must not carry user:password@; put an API key in the environment "
                "(api_key_env) or a file (api_key_file)"
            )
    return [u.rstrip("/") for u in urls]


def _optional_list(value: Any) -> Any:
    return None if value is None else _as_list(value)


def _optional_http(value: list[str] | None) -> list[str] | None:
    return None if value is None else _check_http_urls(value)


def _check_key_source(env: str | None, file: str | None) -> None:
    if env is not None and file is not None:
        raise ValueError("give `api_key_env` or `api_key_file`, not both")
    if env is not None and not _ENV_NAME.match(env):
        raise ValueError(
            "api_key_env must name an environment variable (letters, digits, _), not hold the "
            "key itself"
        )


class GeneratorConfig(_Strict):
    """The generator server(s)."""

    backend: Literal["vllm", "sglang", "llamacpp"] = "vllm"
    urls: Annotated[list[str], Field(min_length=1)]
    model: Annotated[list[str], Field(min_length=1)]
    timeout: Annotated[float, Field(gt=0)] = 300.0
    max_retries: Annotated[int, Field(ge=1)] = 8
    api_key_env: str | None = None
    api_key_file: str | None = None
    vocab_size: Annotated[int, Field(ge=1)] | None = None
    template_url: list[str] | None = None

    _urls = field_validator("urls", "model", mode="before")(_as_list)
    _http = field_validator("urls")(_check_http_urls)

    _template = field_validator("template_url", mode="before")(_optional_list)
    _template_http = field_validator("template_url")(_optional_http)

    @model_validator(mode="after")
    def _key_source(self) -> GeneratorConfig:
        _check_key_source(self.api_key_env, self.api_key_file)
        if self.template_url is not None and self.backend != "sglang":
            raise ValueError("template_url is for backend sglang (which cannot apply a template)")
        return self


class RewardTermConfig(_Strict):
    """One weighted term of a composite reward.

    kinds: `model` (a reward-model server, keys as a plain `reward` section), `lm_logprob`
    (log p_LM of the reply, or of the whole conversation with `scope: conversation`, from a
    vLLM server's prompt log-probs) and `constant` (`value`).
    """

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    weight: Annotated[float, Field(allow_inf_nan=False)] = 1.0
    kind: Literal["model", "lm_logprob", "constant"] = "model"
    format: Literal["vllm", "vllm-pooling", "sglang", "auto"] = "auto"
    urls: list[str] | None = None
    model: str | None = None
    scope: Literal["reply", "conversation"] = "reply"
    value: Annotated[float, Field(allow_inf_nan=False)] | None = None
    timeout: Annotated[float, Field(gt=0)] = 300.0
    max_retries: Annotated[int, Field(ge=1)] = 8
    batch_size: Annotated[int, Field(ge=1)] = 32
    api_key_env: str | None = None
    api_key_file: str | None = None

    _urls = field_validator("urls", mode="before")(_optional_list)
    _http = field_validator("urls")(_optional_http)

    @model_validator(mode="after")
    def _kind_needs(self) -> RewardTermConfig:
        _check_key_source(self.api_key_env, self.api_key_file)
        if self.kind == "constant":
            if self.value is None or self.urls or self.model:
                raise ValueError("a constant term takes `value` and no `urls` / `model`")
        else:
            if not self.urls or not self.model:
                raise ValueError(f"a {self.kind} term needs `urls` and `model`")
            if self.value is not None:
                raise ValueError("`value` is for constant terms")
        if self.kind != "lm_logprob" and self.scope != "reply":
            raise ValueError("`scope` is for lm_logprob terms")
        return self


class RewardConfig(_Strict):
    """The reward-model server(s), or `terms`: a weighted sum of several rewards."""

    format: Literal["vllm", "vllm-pooling", "sglang", "auto"] = "auto"
    urls: list[str] | None = None
    model: str | None = None
    timeout: Annotated[float, Field(gt=0)] = 300.0
    max_retries: Annotated[int, Field(ge=1)] = 8
    batch_size: Annotated[int, Field(ge=1)] = 32
    api_key_env: str | None = None
    api_key_file: str | None = None
    terms: Annotated[list[RewardTermConfig], Field(min_length=1, max_length=16)] | None = None

    _urls = field_validator("urls", mode="before")(_optional_list)
    _http = field_validator("urls")(_optional_http)

    @model_validator(mode="after")
    def _key_source(self) -> RewardConfig:
        _check_key_source(self.api_key_env, self.api_key_file)
        if self.terms is None:
            if not self.urls or not self.model:
                raise ValueError("give `urls` and `model` (one reward model) or `terms`")
            return self
        if self.urls or self.model:
            raise ValueError("`terms` replaces `urls` / `model`: give one or the other")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        if not any(t.kind != "constant" for t in self.terms):
            raise ValueError("a composite reward needs at least one model or lm_logprob term")
        return self


class DatasetConfig(_Strict):
    """Where prompts come from: a named task (with the paper's templates and answer checks),
    inline `prompts`, or a generic local file / hub dataset id."""

    task: str | None = None
    subset: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    prompts: list[str] | None = None
    path: str | None = None
    split: str | None = None
    limit: Annotated[int, Field(ge=1)] | None = None
    shuffle_seed: int | None = None
    prompt_field: str = "question"
    answer_field: str | None = "answer"
    system_prompt: str | None = None
    # the folder of the YAML file the config came from; not part of the sweep's identity, so a
    # sweep resumes from another working directory (or container) with the same fingerprint
    _base_dir: Path | None = PrivateAttr(default=None)

    def resolved_path(self) -> str | None:
        """`path` as given, or next to the YAML file when a relative path names a file there.

        A relative path that exists beside the config file wins; anything else (an absolute
        path, a path relative to the working directory, a hub dataset id) is used as written.
        """
        if self.path is None:
            return None
        p = Path(self.path).expanduser()
        if not p.is_absolute() and self._base_dir is not None and (self._base_dir / p).exists():
            return str(self._base_dir / p)
        return str(p) if p.exists() else self.path

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        if self.task is not None:
            from qalign.tasks import TASKS

            if self.task not in TASKS:
                raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
            if self.prompts is not None:
                raise ValueError("`task` and `prompts` exclude each other")
            return self
        if (self.prompts is None) == (self.path is None):
            raise ValueError(
                "give exactly one of `task`, `prompts` (a list of questions) or `path`"
            )
        if self.prompts is not None and not self.prompts:
            raise ValueError("`prompts` is empty")
        return self


class ExecutionConfig(_Strict):
    """How chains are executed."""

    concurrency: Annotated[int, Field(ge=1)] = 64
    max_attempts: Annotated[int, Field(ge=1)] = 5
    stall_timeout: Annotated[float, Field(gt=0)] = 600.0


class WarmStartConfig(_Strict):
    """Start every chain from the final state of the matching chain of another (finished) sweep
    in the same database: same prompt, same chain index; a source with one run seeds every run,
    otherwise runs match by grid index. Its step 0 is that state, with its reward (no request)."""

    sweep: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class StopWhenConfig(_Strict):
    """Retire a prompt's chains once they converged (see `qalign.core.stopping`)."""

    rhat: Annotated[float, Field(gt=1, allow_inf_nan=False)]
    ess: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    min_steps: Annotated[int, Field(ge=3)] = DEFAULT_MIN_STEPS
    every: Annotated[int, Field(ge=1)] = DEFAULT_EVERY

    def rule(self) -> StopRule:
        return StopRule(rhat=self.rhat, ess=self.ess, min_steps=self.min_steps, every=self.every)


class SmcConfig(_Strict):
    """`method: smc`: particles (`chains_per_prompt`) grow `block_tokens` at a time and are
    resampled when their ESS falls under `ess_threshold` x particles (see `qalign.core.smc`)."""

    block_tokens: Annotated[int, Field(ge=1)]
    ess_threshold: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.5


class SweepConfig(_Strict):
    """A whole sweep. Grid axes (`beta` or, for `power`, `alpha`; `temperature`, `steps`,
    `generator.model`) take a value or a list of values; every combination is one run."""

    # The length is checked by `check_limits` (one line naming the limit), not here.
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    method: Literal["qalign", "quest", "power", "ancestral", "smc"] = "qalign"
    generator: GeneratorConfig
    reward: RewardConfig | None = None
    dataset: DatasetConfig
    beta: Annotated[
        list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)
    ] = [1.0]
    alpha: (
        Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)]
        | None
    ) = None
    temperature: Annotated[
        list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)
    ] = [1.0]
    steps: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    chains_per_prompt: Annotated[int, Field(ge=1)] = 1
    seed: Annotated[int, Field(ge=0, lt=2**62)] = 0
    index: str = "uniform"
    clamp: Annotated[float, Field(gt=0)] = 20.0
    max_new_tokens: Annotated[int, Field(ge=1)] = 512
    max_prompt_length: Annotated[int, Field(ge=1)] = 2048
    execution: ExecutionConfig = ExecutionConfig()
    warm_start: WarmStartConfig | None = None
    stop_when: StopWhenConfig | None = None
    smc: SmcConfig | None = None

    _grid = field_validator("beta", "alpha", "temperature", "steps", mode="before")(_as_list)

    @field_validator("index")
    @classmethod
    def _index(cls, v: str) -> str:
        index_distribution(v)
        return v

    @model_validator(mode="after")
    def _method_needs(self) -> SweepConfig:
        if self.method == "smc":
            _smc_needs(self)
        elif self.smc is not None:
            raise ValueError("the `smc` section is for `method: smc`")
        if self.method in ("qalign", "quest", "smc") and self.reward is None:
            raise ValueError(f"method {self.method!r} needs a `reward` section")
        if self.method == "power":
            self._power_needs()
        elif self.alpha is not None:
            raise ValueError("`alpha` is power sampling's exponent: use it with `method: power`")
        if self.method == "ancestral" and self.steps not in (None, [0]):
            raise ValueError("ancestral runs take no `steps`; set `chains_per_prompt` to n samples")
        if self.warm_start is not None:
            if self.method == "ancestral":
                raise ValueError("warm_start is for qalign and quest chains, not ancestral samples")
            if self.warm_start.sweep == self.name:
                raise ValueError("warm_start.sweep names this sweep itself")
        if self.stop_when is not None:
            if self.method == "power":
                raise ValueError(
                    "stop_when diagnoses the chains' state rewards and power chains have none"
                )
            if self.method == "ancestral":
                raise ValueError("stop_when is for qalign and quest chains, not ancestral samples")
            if self.chains_per_prompt < 2:
                raise ValueError(
                    "stop_when needs chains_per_prompt >= 2: R-hat compares a prompt's chains "
                    f"with each other (got chains_per_prompt: {self.chains_per_prompt})"
                )
        return self

    def _power_needs(self) -> None:
        if self.alpha is None:
            raise ValueError("method 'power' needs `alpha` (the exponent of p_LM, > 0)")
        if self.reward is not None:
            raise ValueError(
                "method 'power' samples p_LM^alpha and uses no reward model; remove the `reward` "
                "section (score the states afterwards with `qalign score`)"
            )
        if "beta" in self.model_fields_set:
            raise ValueError("method 'power' has no `beta`: its strength is `alpha`")
        if self.temperature != [1.0]:
            raise ValueError(
                "method 'power' proposes at temperature 1 (its ratio needs the log-probs of the "
                "distribution proposed from, and those of p_LM, and a server reports one kind); "
                "sharpen with `alpha` instead of `temperature`"
            )

    def grid_axes(self) -> tuple[list[Any], ...]:
        """The grid's axes (beta, or alpha for `power`; temperature, steps, model); each run is a
        point of the product."""
        betas: list[float | None] = [None] if self.method == "ancestral" else list(self.beta)
        if self.method == "power" and self.alpha is not None:
            betas = list(self.alpha)
        step_axis = [0] if self.method == "ancestral" else (self.steps or [DEFAULT_STEPS])
        if self.method == "smc" and self.smc is not None:
            step_axis = [block_count(self.max_new_tokens, self.smc.block_tokens) - 1]
        return betas, list(self.temperature), list(step_axis), list(self.generator.model)

    def runs(self) -> list[RunSpec]:
        """The settings of every grid point, in a stable order."""
        axes = itertools.product(*self.grid_axes())
        execution = ExecutionSpec(**self.execution.model_dump())
        reward = RewardSpec.from_config(self.reward.model_dump()) if self.reward else None
        out = []
        power = self.method == "power"
        for i, (strength, temp, steps, model) in enumerate(axes):
            parts = [f"model={model}", f"T={temp:g}"]
            if strength is not None:
                parts.insert(1, f"{'alpha' if power else 'beta'}={strength:g}")
                parts.append(f"steps={steps}")
            beta, alpha = (None, strength) if power else (strength, None)
            out.append(
                RunSpec(
                    grid_index=i,
                    name=",".join(parts),
                    method=self.method,
                    beta=beta,
                    temperature=temp,
                    steps=steps,
                    chains_per_prompt=self.chains_per_prompt,
                    seed=self.seed,
                    index=self.index,
                    clamp=self.clamp,
                    max_new_tokens=self.max_new_tokens,
                    max_prompt_length=self.max_prompt_length,
                    generator=GeneratorSpec.from_config(
                        self.generator.model_dump() | {"model": model}
                    ),
                    reward=reward,
                    execution=execution,
                    stop_when=self.stop_when.rule() if self.stop_when else None,
                    smc=SmcSpec(**self.smc.model_dump()) if self.smc else None,
                    alpha=alpha,
                )
            )
        return out

    def fingerprint(self) -> str:
        """A hash of everything that defines the sweep's results.

        Where the servers are and how they are called (URLs, timeouts, retries, where the API
        key comes from, batch sizes, the vocabulary-size check) and execution settings are left
        out, so a sweep can resume against servers that moved.
        """
        transport = {
            "urls",
            "timeout",
            "max_retries",
            "api_key_env",
            "api_key_file",
            "batch_size",
            "vocab_size",
            "template_url",
        }
        reward_exclude: dict[str, Any] = dict.fromkeys(transport, True)
        if self.reward is not None and self.reward.terms:
            reward_exclude["terms"] = {"__all__": transport}
        data = self.model_dump(
            mode="json",
            exclude={"execution": True, "generator": transport, "reward": reward_exclude},
        )
        for key in ("warm_start", "stop_when", "smc", "alpha"):
            if data.get(key) is None:
                del data[key]  # sweeps from before the key keep their fingerprint
        if self.reward is not None and not self.reward.terms:
            data["reward"].pop("terms", None)  # sweeps made before composite rewards
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _smc_needs(cfg: SweepConfig) -> None:
    """What `method: smc` requires: its section, and none of the chain-only settings."""
    if cfg.smc is None:
        raise ValueError("method 'smc' needs an `smc` section with `block_tokens`")
    if cfg.steps is not None:
        raise ValueError("smc runs take no `steps`: a run has ceil(max_new_tokens / "
                         "block_tokens) blocks")  # fmt: skip
    for key in ("warm_start", "stop_when"):
        if getattr(cfg, key) is not None:
            raise ValueError(f"{key} is for qalign and quest chains, not smc particles")


_SECRET_KEYS = {"api_key", "apikey", "key", "token", "password", "secret", "bearer"}


def _describe(err: ValidationError) -> str:
    # Only locations and messages: pydantic's input values could be a secret pasted by mistake.
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and str(e["loc"][-1]).lower() in _SECRET_KEYS:
            msg = (
                "unknown key; secrets never go in the config (it is stored in the database): "
                "use api_key_env (an environment variable) or api_key_file (a file holding the key)"
            )
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and the README's config reference)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    # Shortened: the message must stay one readable line even for a 5000-character name.
    text = repr(value)
    if len(text) <= 40:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} digits"
    return f"{text[:24]}... ({size})"


def _lookup(cfg: SweepConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _over(key: str, value: Any, limit: int | str) -> str:
    return f"{key}: {_show(value)} is over the limit of {limit}"


def limit_problems(cfg: SweepConfig) -> list[str]:
    """Every size limit `cfg` breaks, one phrase each (key, value, limit); [] if none."""
    problems = []
    for key, limit in LIMITS.items():
        value = _lookup(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v > limit:
                problems.append(_over(key, v, limit))
    names = [("name", cfg.name), *(("generator.model", m) for m in cfg.generator.model)]
    if cfg.warm_start is not None:
        names.append(("warm_start.sweep", cfg.warm_start.sweep))
    urls = [("generator.urls", u) for u in cfg.generator.urls]
    urls += [("generator.template_url", u) for u in cfg.generator.template_url or []]
    if cfg.reward is not None:
        sections: list[tuple[str, Any]] = [("reward", cfg.reward)]
        sections += [(f"reward.terms.{i}", t) for i, t in enumerate(cfg.reward.terms or [])]
        for where, section in sections:
            if section.model is not None:
                names.append((f"{where}.model", section.model))
            urls += [(f"{where}.urls", u) for u in section.urls or []]
            if where != "reward":
                for key in ("max_retries", "batch_size"):
                    value = getattr(section, key)
                    if value > LIMITS[f"reward.{key}"]:
                        problems.append(_over(f"{where}.{key}", value, LIMITS[f"reward.{key}"]))
                for key in ("weight", "value", "timeout"):
                    value = getattr(section, key)
                    if isinstance(value, float) and not math.isfinite(value):
                        problems.append(f"{where}.{key}: {value!r} is not a finite number")
    for key, name in names:
        if len(name) > MAX_NAME_CHARS:
            problems.append(_over(key, name, f"{MAX_NAME_CHARS} characters"))
    for key, url in urls:
        if len(url) > MAX_URL_CHARS:
            problems.append(_over(key, url, f"{MAX_URL_CHARS} characters"))
    for key in FINITE_KEYS:
        value = _lookup(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{key}: {v!r} is not a finite number")
    # A lower bound (at least one prompt), so a grid x chains_per_prompt that is already too big
    # is refused before any dataset is loaded.
    runs, per_prompt = _run_count(cfg), cfg.chains_per_prompt
    if per_prompt <= LIMITS["chains_per_prompt"] and runs * per_prompt > MAX_SWEEP_CHAINS:
        problems.append(_chains_problem(runs, None, cfg.chains_per_prompt))
    return problems


def _run_count(cfg: SweepConfig) -> int:
    return math.prod(len(axis) for axis in cfg.grid_axes())


def _chains_problem(runs: int, prompts: int | None, per_prompt: int) -> str:
    n = runs * (prompts or 1) * per_prompt
    of = f"{runs} run(s) x {'at least 1' if prompts is None else prompts} prompt(s)"
    return (
        f"chains_per_prompt: {per_prompt} gives {of} x {per_prompt} = {n} chains, over the limit "
        f"of {MAX_SWEEP_CHAINS} chains per sweep (lower chains_per_prompt, dataset.limit or the "
        "grid axes)"
    )


def check_chain_count(cfg: SweepConfig, prompts: int) -> None:
    """`ConfigLimitError` if the sweep's chains (runs x prompts x chains_per_prompt) are over
    the limit; call it once the prompts are counted, before any database or server is used."""
    runs = _run_count(cfg)
    if runs * prompts * cfg.chains_per_prompt > MAX_SWEEP_CHAINS:
        raise ConfigLimitError(
            f"{cfg.name}: {_chains_problem(runs, prompts, cfg.chains_per_prompt)}"
        )


def parse_config(data: Any, source: str = "config") -> SweepConfig:
    """Validate a parsed YAML mapping; raise `ConfigError` naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source} is invalid:\n{_describe(err)}") from None
    problems = limit_problems(cfg)
    if problems:
        # One line, so the CLI prints exactly one `Error:` line.
        raise ConfigLimitError(f"{source}: {'; '.join(problems)} (see the README's Limits)")
    return cfg


class BoundedLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses alias bombs and self-referencing aliases.

    PyYAML shares an aliased node rather than copying it, so a "billion laughs" file loads in
    microseconds -- and then pydantic, `model_dump` and JSON walk every shared reference, which
    is exponential. Counting the values each alias stands for bounds that walk; a self-reference
    would be a cyclic structure that pydantic cannot validate at all.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._alias_values = 0
        self._sizes: dict[int, int] = {}
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        if isinstance(event, AliasEvent):
            if event.anchor in self._open_anchors:
                raise ConfigLimitError(
                    f"alias *{event.anchor} {_where(event)} refers to the value that holds it; "
                    "a config cannot contain itself"
                )
            node = super().compose_node(parent, index)
            if node is not None:
                self._alias_values += self._size(node)
                if self._alias_values > MAX_ALIAS_VALUES:
                    raise ConfigLimitError(
                        f"alias *{event.anchor} {_where(event)}: YAML aliases expand to more "
                        f"than the limit of {MAX_ALIAS_VALUES} values; write the values out"
                    )
            return node
        anchor = event.anchor if isinstance(event, CollectionStartEvent) else None
        if anchor is None:
            return super().compose_node(parent, index)
        self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(anchor)

    def _size(self, node: Node) -> int:
        """Values `node` expands to, aliases inside it included (memoised: shared nodes)."""
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        size = 1
        if isinstance(node, MappingNode):
            for k, v in node.value:
                size += self._size(k) + self._size(v)
        elif isinstance(node, CollectionNode):
            size += sum(self._size(child) for child in node.value)
        self._sizes[id(node)] = size
        return size


def _where(event: Any) -> str:
    mark = event.start_mark
    return "" if mark is None else f"at line {mark.line + 1}"


def load_config(path: str | os.PathLike[str]) -> SweepConfig:
    """Read and validate a YAML sweep config."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            # Read at most one byte past the limit: a config on /dev/zero must not fill memory.
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigLimitError(
            f"{p}: the config file is over the limit of {MAX_CONFIG_BYTES} bytes (1 MiB); put "
            "long prompt lists in a dataset file (dataset.path)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {p} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        data = _load_yaml(text)
    except ConfigLimitError as exc:
        raise ConfigLimitError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    except (ValueError, TypeError, AttributeError) as exc:
        # PyYAML's resolvers raise these for values such as an impossible date (2024-13-01).
        raise ConfigError(f"{p} holds a value YAML cannot construct: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{p} is nested too deeply to be a sweep config") from None
    cfg = parse_config(data, str(p))
    cfg.dataset._base_dir = p.resolve().parent
    return cfg


def _load_yaml(text: str) -> Any:
    loader = BoundedLoader(text)  # its reader already refuses characters YAML forbids
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
