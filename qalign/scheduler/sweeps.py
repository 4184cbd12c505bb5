"""Sweep operations shared by the CLI: create, enqueue/resume, reap, cancel."""

from __future__ import annotations

import datetime as dt
from typing import Any

from qalign.clients.errors import ClientError
from qalign.config import ConfigError, SweepConfig
from qalign.datasets import load_prompts
from qalign.sampling.loop import run_sync
from qalign.scheduler.dispatch import CeleryDispatcher
from qalign.storage import repo
from qalign.workers.execute import ClientCache


async def _check_servers(cfg: SweepConfig, startup_timeout: float) -> None:
    cache = ClientCache(startup_timeout=startup_timeout)
    try:
        for run in cfg.runs():
            try:
                await cache.generator(run["generator"])
            except ClientError as exc:
                raise ConfigError(f"generator ({', '.join(cfg.generator.urls)}): {exc}") from None
            if run["reward"] is not None:
                try:
                    await cache.reward(run["reward"])
                except ClientError as exc:
                    raise ConfigError(
                        f"reward ({', '.join(run['reward']['urls'])}): {exc}"
                    ) from None
    finally:
        await cache.close()


def check_servers(cfg: SweepConfig, startup_timeout: float = 15.0) -> None:
    """Contact every generator and reward server of the sweep; `ConfigError` if one is unusable
    (unreachable within `startup_timeout` seconds, or the named model is not served)."""
    run_sync(_check_servers(cfg, startup_timeout))


def create_sweep(
    sessions: repo.Sessions, cfg: SweepConfig, *, check: bool = True, server_wait: float = 15.0
) -> tuple[int, bool]:
    """Validate the dataset and servers, then write the sweep (idempotent by name + config)."""
    prompts = load_prompts(cfg.dataset)
    if check:
        check_servers(cfg, server_wait)
    config: dict[str, Any] = cfg.model_dump(mode="json")
    return repo.create_sweep(sessions, cfg.name, config, cfg.fingerprint(), cfg.runs(), prompts)


def enqueue_unfinished(
    sessions: repo.Sessions,
    sweep_id: int,
    dispatcher: CeleryDispatcher,
    *,
    retry_failed: bool = False,
) -> int:
    """Send the next step of every unfinished chain (start, or resume after any loss)."""
    repo.reactivate_sweep(sessions, sweep_id)
    return _send(sessions, dispatcher, repo.unfinished_chains(sessions, sweep_id, retry_failed))


def reap(sessions: repo.Sessions, dispatcher: CeleryDispatcher, stall_timeout: float) -> int:
    """Re-send the next step of chains untouched for `stall_timeout` seconds."""
    return _send(
        sessions, dispatcher, repo.stalled_chains(sessions, dt.timedelta(seconds=stall_timeout))
    )


def _send(
    sessions: repo.Sessions, dispatcher: CeleryDispatcher, todo: list[tuple[int, int]]
) -> int:
    """Enqueue (chain, step) hints and touch the chains so the reaper does not resend them."""
    n = dispatcher.enqueue_many(todo)
    repo.mark_enqueued(sessions, [cid for cid, _ in todo])
    return n
