"""Sweep operations shared by the CLI: create, enqueue/resume, reap."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from qalign.clients.errors import ClientError
from qalign.clients.registry import ClientRegistry
from qalign.config import (
    LIMITS,
    ConfigError,
    ConfigLimitError,
    SweepConfig,
    check_chain_count,
)
from qalign.datasets import PromptRow, load_prompts
from qalign.dispatch.base import Dispatcher
from qalign.sampling.loop import run_sync
from qalign.storage import repo


async def _check_servers(cfg: SweepConfig, startup_timeout: float) -> None:
    registry = ClientRegistry(startup_timeout=startup_timeout)
    try:
        for run in cfg.runs():
            try:
                await registry.generator(run.generator)
            except ClientError as exc:
                raise ConfigError(f"generator ({', '.join(run.generator.urls)}): {exc}") from None
            if run.reward is not None:
                try:
                    await registry.reward(run.reward)
                except ClientError as exc:
                    raise ConfigError(f"reward ({', '.join(run.reward.urls)}): {exc}") from None
    finally:
        await registry.close()


def check_servers(cfg: SweepConfig, startup_timeout: float = 15.0) -> None:
    """Contact every generator and reward server of the sweep; `ConfigError` if one is unusable
    (unreachable within `startup_timeout` seconds, or the named model is not served)."""
    run_sync(_check_servers(cfg, startup_timeout))


def sweep_prompts(cfg: SweepConfig) -> list[PromptRow]:
    """Load the sweep's prompts and check its chain count (`ConfigLimitError` if too many).

    The CLI calls this before it opens the database: a sweep too big to create must not leave
    an SQLite file behind or touch a server.
    """
    prompts = load_prompts(cfg.dataset)
    check_chain_count(cfg, len(prompts))
    return prompts


def create_sweep(
    sessions: repo.Sessions,
    cfg: SweepConfig,
    *,
    check: bool = True,
    server_wait: float = 15.0,
    prompts: Sequence[PromptRow] | None = None,
) -> tuple[int, bool]:
    """Validate the dataset and servers, then write the sweep (idempotent by name + config).

    `prompts` are those `sweep_prompts(cfg)` returned, when the caller loaded them already.
    """
    if prompts is None:
        prompts = sweep_prompts(cfg)
    else:
        check_chain_count(cfg, len(prompts))
    if check:
        check_servers(cfg, server_wait)
    runs = [run.to_config() for run in cfg.runs()]
    config = cfg.model_dump(mode="json")
    warm = cfg.warm_start.sweep if cfg.warm_start is not None else None
    try:
        return repo.create_sweep(
            sessions, cfg.name, config, cfg.fingerprint(), runs, prompts, warm_start=warm
        )
    except repo.WarmStartError as exc:
        raise ConfigError(f"{cfg.name}: {exc}") from None
    except repo.SweepExistsError:
        if _differs_only_in_steps(sessions, cfg):
            raise repo.SweepExistsError(
                f"sweep {cfg.name!r} already exists with other `steps`; to give its chains "
                f"more steps, run `qalign sweep extend {cfg.name} --steps N` (afterwards the "
                "config it was created with resumes it), or choose another `name` for a fresh "
                "sweep"
            ) from None
        raise


def _differs_only_in_steps(sessions: repo.Sessions, cfg: SweepConfig) -> bool:
    stored = repo.find_sweep(sessions, cfg.name)
    same_steps = cfg.model_copy(update={"steps": stored.config.get("steps")})
    return bool(same_steps.fingerprint() == stored.config_hash)


def extend_sweep(
    sessions: repo.Sessions, sweep_id: int, steps: int, runs: Sequence[str] | None = None
) -> list[repo.Extension]:
    """Raise the steps per chain of the sweep's runs to `steps` (see `repo.extend_sweep`);
    `enqueue_unfinished` or `run_locally` then continues every chain from its last step."""
    if steps > LIMITS["steps"]:
        raise ConfigLimitError(
            f"--steps: {steps} is over the limit of {LIMITS['steps']} (see the README's Limits)"
        )
    return repo.extend_sweep(sessions, sweep_id, steps, runs)


def enqueue_unfinished(
    sessions: repo.Sessions,
    sweep_id: int,
    dispatcher: Dispatcher,
    *,
    retry_failed: bool = False,
) -> int:
    """Hand on the next step of every unfinished chain (start, or resume after any loss)."""
    repo.reactivate_sweep(sessions, sweep_id)
    return _send(sessions, dispatcher, repo.unfinished_chains(sessions, sweep_id, retry_failed))


def reap(sessions: repo.Sessions, dispatcher: Dispatcher, stall_timeout: float | None) -> int:
    """Re-send the next step of chains untouched for `stall_timeout` seconds (None: each
    sweep's own `execution.stall_timeout`)."""
    older = None if stall_timeout is None else dt.timedelta(seconds=stall_timeout)
    return _send(sessions, dispatcher, repo.stalled_chains(sessions, older))


def _send(sessions: repo.Sessions, dispatcher: Dispatcher, todo: list[tuple[int, int]]) -> int:
    """Hand on (chain, step) hints and touch the chains so the reaper does not resend them."""
    repo.mark_enqueued(sessions, [cid for cid, _ in todo])
    return dispatcher.enqueue_many(todo)
