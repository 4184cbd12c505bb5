"""Data access for sweeps and chains. Every function runs one short transaction.

Never call these with a transaction held across an HTTP request: load, release, talk to the
servers, then commit in a new transaction (`commit_step` re-checks the chain with a
compare-and-set on `current_step`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import ColumnElement, Engine, and_, case, distinct, func, insert, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qalign.core import Finish, State
from qalign.storage import hotpath
from qalign.storage.errors import ChainNotFoundError
from qalign.storage.models import (
    Chain,
    ChainStatus,
    Prompt,
    PromptEncoding,
    Proposal,
    Run,
    StepError,
    Sweep,
    SweepExtension,
    SweepStatus,
    utcnow,
)

Sessions = sessionmaker[Session]
FINAL = (
    ChainStatus.DONE.value,
    ChainStatus.FAILED.value,
    ChainStatus.CANCELLED.value,
    ChainStatus.CONVERGED.value,
)
# chains that reached their end: a warm start may take their state
FINISHED = (ChainStatus.DONE.value, ChainStatus.CONVERGED.value)


class SweepExistsError(ValueError):
    """A sweep of that name exists with a different config."""


class SweepNotFoundError(LookupError):
    """No sweep of that name or id."""


class WarmStartError(ValueError):
    """The sweep named by `warm_start` cannot seed this sweep's chains (the message says why)."""


class ExtendError(ValueError):
    """A `qalign sweep extend` that cannot be done (the message says why)."""


def _engine(sessions: Sessions) -> Engine:
    bind = sessions.kw["bind"]
    assert isinstance(bind, Engine), "qalign sessionmakers are bound to one engine"
    return bind


def _rowcount(s: Session, stmt: Any) -> int:
    return int(cast(CursorResult[Any], s.execute(stmt)).rowcount)


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


# AVG/SUM over doubles near 1e308 overflow: PostgreSQL raises "value out of range" (its AVG
# also sums squares, which overflow from ~1e154) and SQLite returns inf. Values with |x| >= 1
# are summed scaled by 2**-64 (exact, and far from underflow, which PostgreSQL raises on too),
# the rest unscaled, so no partial sum can overflow below 2**64 rows.
_MEAN_SCALE = 2.0**-64
_FLOAT_MAX = sys.float_info.max


def finite_mean_columns(col: Any) -> tuple[ColumnElement[Any], ...]:
    """SQL aggregates for `finite_mean`: the mean of `col` over its finite values only.

    ±inf and NaN are left out (PostgreSQL sorts NaN above every number, so BETWEEN rejects it;
    SQLite stores NaN as NULL).
    """
    finite = col.between(-_FLOAT_MAX, _FLOAT_MAX)
    large = func.abs(col) >= 1.0
    return (
        func.sum(case((and_(finite, large), col * _MEAN_SCALE))),
        func.sum(case((and_(finite, ~large), col))),
        func.count(case((finite, 1))),
    )


def finite_mean(large_scaled: Any, small: Any, n: Any) -> float | None:
    """The mean from the three values `finite_mean_columns` selected (None without any)."""
    if not n:
        return None
    return float(large_scaled or 0.0) / int(n) / _MEAN_SCALE + float(small or 0.0) / int(n)


def _text(t: str) -> str:
    # PostgreSQL text cannot hold NUL; keep the row (ids stay exact) and mark the character.
    return t.replace("\x00", "\ufffd")


def _json_logprobs(lps: Sequence[float] | None) -> list[float] | None:
    # JSON has no inf/NaN; a state whose logprobs are not all finite is stored without them
    # (QUEST then rejects moves from it with `missing_logprobs` rather than storing garbage).
    if lps is None or not all(math.isfinite(x) for x in lps):
        return None
    return list(lps)


# ---- creation ------------------------------------------------------------------------------


def create_sweep(
    sessions: Sessions,
    name: str,
    config: dict[str, Any],
    fingerprint: str,
    runs: Sequence[dict[str, Any]],
    prompts: Sequence[Any],
    warm_start: str | None = None,
) -> tuple[int, bool]:
    """Insert a sweep with its runs, prompts and chains; returns (sweep id, created).

    Creating the same sweep again (same name and fingerprint) adds nothing; it only refreshes
    the server sections (URLs, timeouts), which the fingerprint leaves out, and keeps each
    run's `steps` (raised by `extend_sweep`). The same name with another config raises
    `SweepExistsError`.

    `warm_start` names a finished sweep whose chains' final states become the initial states
    of the new chains (see `_warm_sources`; `WarmStartError` when it cannot); the copy is made
    in the creating transaction, and each chain records its source chain and step.
    """
    with sessions.begin() as s:
        existing = s.execute(select(Sweep).where(Sweep.name == name)).scalar_one_or_none()
        if existing is not None:
            if existing.config_hash != fingerprint:
                raise SweepExistsError(
                    f"sweep {name!r} already exists with a different config; choose another "
                    "`name` (a sweep's results must come from one config)"
                )
            existing.config = config
            by_index = {r["grid_index"]: r for r in runs}
            for run in s.execute(select(Run).where(Run.sweep_id == existing.id)).scalars():
                fresh = by_index.get(run.grid_index)
                if fresh is not None:
                    run.config = {**fresh, "steps": run.steps}  # an extension outlives re-creates
            return existing.id, False
        sources = None if warm_start is None else _warm_sources(s, warm_start, runs, prompts)
        sweep = Sweep(name=name, config=config, config_hash=fingerprint)
        s.add(sweep)
        s.flush()
        run_rows = [
            Run(
                sweep_id=sweep.id,
                grid_index=r["grid_index"],
                name=r["name"],
                method=r["method"],
                beta=r["beta"],
                temperature=r["temperature"],
                steps=r["steps"],
                generator_model=r["generator_model"],
                reward_model=r["reward_model"],
                config=r,
            )
            for r in runs
        ]
        s.add_all(run_rows)
        prompt_rows = [
            Prompt(
                sweep_id=sweep.id,
                prompt_index=p.index,
                messages=p.messages,
                reference=p.reference,
                row=p.row,
            )
            for p in prompts
        ]
        s.add_all(prompt_rows)
        s.flush()
        now = utcnow()
        chain_values = [
            {
                "run_id": run.id,
                "prompt_id": prompt.id,
                "chain_index": k,
                "seed": int(run.config["seed"]),
                "rng_key": f"{run.grid_index}/{prompt.prompt_index}/{k}",
                "target_steps": run.steps,
                "current_step": -1,
                "status": ChainStatus.PENDING.value,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
                **(sources or {}).get(run.grid_index, {}).get((prompt.prompt_index, k), {}),
            }
            for run in run_rows
            for prompt in prompt_rows
            for k in range(int(run.config["chains_per_prompt"]))
        ]
        for start in range(0, len(chain_values), 5000):
            s.execute(insert(Chain), chain_values[start : start + 5000])
        return sweep.id, True


_STATE_COLUMNS = ("state_tokens", "state_logprobs", "state_reward", "state_finish", "state_text")


def _warm_sources(
    s: Session, source: str, runs: Sequence[dict[str, Any]], prompts: Sequence[Any]
) -> dict[int, dict[tuple[int, int], dict[str, Any]]]:
    """Per grid index of the new sweep, per (prompt index, chain index): the columns its chain
    starts from (the source chain's state, id and last step).

    The mapping: a source with one run seeds every run; otherwise the source must have the
    same grid (as many runs), matched by grid index. Each pair must use the same generator
    model, the same `max_new_tokens` and the same reward model (when the source has one); the
    prompts must be the same, in the same order; the source must have at least
    `chains_per_prompt` chains per prompt, each `done` with a scored state.
    """
    src = s.execute(select(Sweep).where(Sweep.name == source)).scalar_one_or_none()
    if src is None:
        raise WarmStartError(f"warm_start.sweep: there is no sweep {source!r} in this database")
    src_runs = list(
        s.execute(select(Run).where(Run.sweep_id == src.id).order_by(Run.grid_index)).scalars()
    )
    if len(src_runs) == 1:
        pairs = [(run, src_runs[0]) for run in runs]
    elif [r.grid_index for r in src_runs] == sorted(int(r["grid_index"]) for r in runs):
        by_grid = {r.grid_index: r for r in src_runs}
        pairs = [(run, by_grid[int(run["grid_index"])]) for run in runs]
    else:
        raise WarmStartError(
            f"warm_start.sweep: {source!r} has {len(src_runs)} runs and this sweep "
            f"{len(runs)}: which run starts which is ambiguous (the source needs one run, or "
            "the same grid)"
        )
    for run, src_run in pairs:
        problems = []
        if src_run.generator_model != run["generator_model"]:
            problems.append(
                f"generator model {src_run.generator_model!r}, not {run['generator_model']!r}"
            )
        if src_run.reward_model is not None and src_run.reward_model != run["reward_model"]:
            problems.append(f"reward model {src_run.reward_model!r}, not {run['reward_model']!r}")
        src_max = src_run.config.get("max_new_tokens")
        if src_max != run["max_new_tokens"]:
            problems.append(f"max_new_tokens {src_max}, not {run['max_new_tokens']}")
        src_k = int(src_run.config.get("chains_per_prompt", 0))
        if src_k < int(run["chains_per_prompt"]):
            problems.append(
                f"{src_k} chains per prompt, fewer than chains_per_prompt "
                f"{run['chains_per_prompt']}"
            )
        if problems:
            raise WarmStartError(
                f"warm_start.sweep: run {src_run.name!r} of {source!r} cannot start run "
                f"{run['name']!r}: it has {'; '.join(problems)}"
            )
    src_prompts = s.execute(
        select(Prompt.prompt_index, Prompt.messages)
        .where(Prompt.sweep_id == src.id)
        .order_by(Prompt.prompt_index)
    ).all()
    if [(i, list(m)) for i, m in src_prompts] != [(p.index, list(p.messages)) for p in prompts]:
        raise WarmStartError(
            f"warm_start.sweep: {source!r} has a different dataset ({len(src_prompts)} prompts; "
            f"this sweep {len(prompts)}): a chain can only start from the same prompt"
        )
    needed = {src_run.id for _, src_run in pairs}
    rows = s.execute(
        select(
            Chain.run_id, Prompt.prompt_index, Chain.chain_index, Chain.id, Chain.status,
            Chain.current_step, *(getattr(Chain, c) for c in _STATE_COLUMNS),
        )
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .where(Chain.run_id.in_(needed))
    ).all()  # fmt: skip
    found = {(r[0], r[1], r[2]): r for r in rows}
    out: dict[int, dict[tuple[int, int], dict[str, Any]]] = {}
    unfinished = unscored = 0
    for run, src_run in pairs:
        per = out.setdefault(int(run["grid_index"]), {})
        for p in prompts:
            for k in range(int(run["chains_per_prompt"])):
                row = found.get((src_run.id, p.index, k))
                if row is None or row[4] not in FINISHED or row[6] is None:
                    unfinished += 1
                    continue
                if row[8] is None or not math.isfinite(row[8]):
                    unscored += 1
                    continue
                per[(p.index, k)] = {
                    "source_chain_id": row[3],
                    "source_step": row[5],
                    **dict(zip(_STATE_COLUMNS, row[6:], strict=True)),
                }
    if unfinished:
        raise WarmStartError(
            f"warm_start.sweep: {source!r} is not finished: {unfinished} of the chains to start "
            "from are not done (finish it first, e.g. `qalign sweep status`)"
        )
    if unscored:
        raise WarmStartError(
            f"warm_start.sweep: {unscored} final states of {source!r} have no finite reward "
            f"(score them first: `qalign score {source}`)"
        )
    return out


def find_sweep(sessions: Sessions, ref: str | int) -> Sweep:
    """A sweep by name or numeric id."""
    with sessions() as s:
        q = select(Sweep).where(Sweep.name == str(ref))
        sweep = s.execute(q).scalar_one_or_none()
        if sweep is None and str(ref).isdigit():
            sweep = s.get(Sweep, int(ref))
        if sweep is None:
            names = s.execute(select(Sweep.name).order_by(Sweep.id)).scalars().all()
            known = ", ".join(names[-10:]) or "none yet"
            raise SweepNotFoundError(f"no sweep {ref!r} in this database (sweeps: {known})")
        return sweep


def list_sweeps(sessions: Sessions) -> list[Sweep]:
    with sessions() as s:
        return list(s.execute(select(Sweep).order_by(Sweep.id)).scalars())


# ---- one step ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainRow:
    """A chain as a step reads it.

    Cancelling a sweep marks its unfinished chains `cancelled`, so the chain's own status is
    enough to skip work; the sweep row is not read on the hot path. A chain with a `state`
    before its step 0 was warm-started: the state was copied from its source chain.
    """

    chain_id: int
    run_id: int
    prompt_id: int
    rng_key: str
    seed: int
    target_steps: int
    current_step: int
    status: str
    attempts: int
    state: State | None
    state_text: str | None
    updated_at: dt.datetime


def committed_row(chain: ChainRow, step: int, target: int, state: State, text: str) -> ChainRow:
    """`chain` as `commit_step` left it after step `step` (the stored target it returned, the new
    state), equal to what `read_chain` would read back: a driver going on with the chain needs
    no second read. Stored values are normalised the way the commit stores them."""
    lps = _json_logprobs(state.logprobs)
    return dataclasses.replace(
        chain,
        target_steps=target,
        current_step=step,
        status=ChainStatus.DONE.value if step >= target else ChainStatus.RUNNING.value,
        attempts=0,
        state=State(
            tokens=tuple(state.tokens),
            reward=state.reward,
            finish=state.finish,
            logprobs=None if lps is None else tuple(lps),
        ),
        state_text=_text(text),
        updated_at=utcnow(),
    )


def read_chain(sessions: Sessions, chain_id: int) -> ChainRow:
    """One primary-key read of the chain; `LookupError` when there is no such chain."""
    row = hotpath.read_chain(_engine(sessions), chain_id)
    if row is None:
        raise ChainNotFoundError(f"chain {chain_id} does not exist")
    (run_id, prompt_id, rng_key, seed, target, current, status, attempts,
     tokens, logprobs, reward, finish, text, updated_at) = row  # fmt: skip
    state = None
    if tokens is not None:
        state = State(
            tokens=tuple(tokens),
            reward=math.nan if reward is None else reward,
            finish=Finish(finish or Finish.STOP.value),
            logprobs=None if logprobs is None else tuple(logprobs),
        )
    return ChainRow(
        chain_id=chain_id,
        run_id=run_id,
        prompt_id=prompt_id,
        rng_key=rng_key,
        seed=seed,
        target_steps=target,
        current_step=current,
        status=status,
        attempts=attempts,
        state=state,
        state_text=text,
        updated_at=updated_at,
    )


@dataclass(frozen=True)
class Sibling:
    """A chain of a prompt's run, as the `stop_when` checkpoint sees it."""

    chain_id: int
    current_step: int
    status: str


def prompt_chains(sessions: Sessions, run_id: int, prompt_id: int) -> list[Sibling]:
    """The chains of one prompt in one run, in chain order."""
    with sessions() as s:
        rows = s.execute(
            select(Chain.id, Chain.current_step, Chain.status)
            .where(Chain.run_id == run_id, Chain.prompt_id == prompt_id)
            .order_by(Chain.chain_index)
        ).all()
    return [Sibling(int(c), int(k), str(st)) for c, k, st in rows]


def state_rows(
    sessions: Sessions, chain_ids: Sequence[int], upto: int
) -> list[tuple[int, int, bool, float | None, int]]:
    """(chain id, step, accepted, reward, response_len) of the chains' proposals at steps
    0..`upto`, in the order of `chain_ids`, then by step."""
    with sessions() as s:
        rows = s.execute(
            select(Proposal.chain_id, Proposal.step, Proposal.accepted, Proposal.reward,
                   Proposal.response_len)
            .where(Proposal.chain_id.in_(list(chain_ids)), Proposal.step <= upto)
            .order_by(Proposal.chain_id, Proposal.step)
        ).all()  # fmt: skip
    order = {cid: i for i, cid in enumerate(chain_ids)}
    out = [(int(c), int(k), bool(a), r, int(n)) for c, k, a, r, n in rows]
    return sorted(out, key=lambda row: (order[row[0]], row[1]))


def retire_converged(sessions: Sessions, run_id: int, prompt_id: int, step: int) -> int:
    """Mark the prompt's unfinished chains at `step` `converged`; returns how many moved.

    Idempotent: every process that checks the same checkpoint reaches the same verdict, so a
    second call finds nothing left to move.
    """
    with sessions.begin() as s:
        return _rowcount(
            s,
            update(Chain)
            .where(
                Chain.run_id == run_id,
                Chain.prompt_id == prompt_id,
                Chain.current_step == step,
                Chain.status.not_in(FINAL),
            )
            .values(status=ChainStatus.CONVERGED.value, updated_at=utcnow()),
        )


def run_settings(sessions: Sessions, run_id: int) -> tuple[int, dict[str, Any]]:
    """(sweep id, stored config) of a run. Not cached here: `qalign sweep create` may refresh
    the config's server and execution sections, and callers decide how long to trust it."""
    with sessions() as s:
        row = s.execute(select(Run.sweep_id, Run.config).where(Run.id == run_id)).one_or_none()
    if row is None:
        raise LookupError(f"run {run_id} does not exist")
    return int(row[0]), dict(row[1])


@functools.lru_cache(maxsize=4096)
def prompt_messages(sessions: Sessions, prompt_id: int) -> list[dict[str, Any]]:
    """A prompt's messages (immutable after creation, so cached per process)."""
    with sessions() as s:
        messages = s.execute(select(Prompt.messages).where(Prompt.id == prompt_id)).scalar_one()
    return list(messages)


# keyed by the sessionmaker itself (not its id, which Python may reuse for another database)
_encodings: dict[tuple[Sessions, int, str], list[int]] = {}


def prompt_encoding(sessions: Sessions, prompt_id: int, model: str) -> list[int] | None:
    """A prompt's stored templated token ids for `model`, or None before the first step."""
    key = (sessions, prompt_id, model)
    enc = _encodings.get(key)
    if enc is None:
        with sessions() as s:
            stored = s.execute(
                select(PromptEncoding.token_ids).where(
                    PromptEncoding.prompt_id == prompt_id, PromptEncoding.model == model
                )
            ).scalar_one_or_none()
        if stored is not None:
            enc = _encodings[key] = list(stored)
    return enc


def save_encoding(sessions: Sessions, prompt_id: int, model: str, token_ids: Sequence[int]) -> None:
    """Store a prompt's templated ids once; a concurrent duplicate insert is harmless."""
    try:
        with sessions.begin() as s:
            s.add(
                PromptEncoding(
                    prompt_id=prompt_id,
                    model=model,
                    token_ids=list(token_ids),
                    n_tokens=len(token_ids),
                )
            )
    except IntegrityError:
        pass  # another worker stored the same encoding first; it is identical by construction


STEP_PARAMS = (
    "chain_id", "run_id", "step", "cut", "new_tokens", "response_len", "text", "reward",
    "log_a", "alpha", "accepted", "finish", "reject_reason", "gen_seed", "reward_tokens",
    "gen_latency_ms", "reward_latency_ms", "endpoint", "worker", "state_tokens",
    "state_logprobs", "state_reward", "state_finish", "state_text", "reward_terms",
    "generator_seconds", "reward_seconds", "queue_seconds", "log_weight",
)  # fmt: skip


def commit_step(sessions: Sessions, params: dict[str, Any]) -> int | None:
    """Append a proposal and move its chain, atomically; returns the chain's stored
    `target_steps` as the move saw it, or None if the step was already taken.

    `params` holds exactly `STEP_PARAMS` (the proposal's columns and the chain's new state).
    The chain becomes `done` when `step` reaches its stored `target_steps` (read by the commit
    itself, so an extension made meanwhile counts), else `running`. The chain moves only if
    its `current_step` is still `step - 1` (compare-and-set), and the proposal's unique
    (chain_id, step) key catches anything that slips past; either way a duplicate delivery
    changes nothing. Values SQL
    cannot hold are stored as described in `_text`, `_finite_or_none` and `_json_logprobs`.
    """
    return hotpath.commit(_engine(sessions), _step_row(params))


def commit_steps(sessions: Sessions, batch: Sequence[dict[str, Any]]) -> list[int | None]:
    """`commit_step` for several steps at once, in one transaction (on PostgreSQL, pipelined);
    each step is still its own compare-and-set.
    Returns what `commit_step` would, in order."""
    rows = [_step_row(p) for p in batch]
    engine = _engine(sessions)
    if engine.dialect.name == "sqlite":
        return hotpath.commit_many_sqlite(engine, rows)
    return hotpath.commit_many_pg(engine, rows)


def _step_row(params: dict[str, Any]) -> dict[str, Any]:
    """A step's commit parameters as stored (see `commit_step`)."""
    if set(params) != set(STEP_PARAMS):
        raise ValueError(f"commit_step takes exactly {STEP_PARAMS}, got {sorted(params)}")
    p = dict(params)
    p["prev"] = p["step"] - 1
    p["gen_tokens"] = len(p["new_tokens"])
    p["new_tokens"] = list(p["new_tokens"])
    p["text"] = _text(p["text"])
    p["reward"] = _finite_or_none(p["reward"])
    p["log_a"] = _finite_or_none(p["log_a"])
    if p["log_weight"] is not None and not math.isfinite(p["log_weight"]):
        p["log_weight"] = None  # a dead particle: NULL reads as zero weight
    p["state_tokens"] = list(p["state_tokens"])
    p["state_logprobs"] = _json_logprobs(p["state_logprobs"])
    p["state_reward"] = _finite_or_none(p["state_reward"])
    p["state_text"] = _text(p["state_text"])
    if p["reward_terms"] is not None:
        p["reward_terms"] = {k: _finite_or_none(v) for k, v in p["reward_terms"].items()}
    p["created_at"] = utcnow()
    return p


_KIND = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*): ")


def error_kind(error: str) -> str:
    """The exception class name that starts an error message ("Type: text"), else "error"."""
    m = _KIND.match(error)
    return m.group(1)[:80] if m else "error"


def record_failure(
    sessions: Sessions, chain_id: int, step: int, error: str, max_attempts: int
) -> tuple[str, int]:
    """Count a failed attempt at `step` and log it in `step_errors`; the chain fails for good
    after `max_attempts`. Returns the chain's status and attempts afterwards (unchanged when
    the step was taken meanwhile or the chain finished)."""
    with sessions.begin() as s:
        chain = s.get(Chain, chain_id, with_for_update=True)
        if chain is None:
            return ChainStatus.FAILED.value, 0
        if chain.status in FINAL or chain.current_step >= step:
            return chain.status, chain.attempts
        chain.attempts += 1
        chain.last_error = f"step {step}: {error}"[:4000]
        s.add(
            StepError(
                chain_id=chain.id,
                run_id=chain.run_id,
                step=step,
                attempt=chain.attempts,
                kind=error_kind(error),
                error=error[:4000],
            )
        )
        chain.status = (
            ChainStatus.FAILED.value
            if chain.attempts >= max_attempts
            else ChainStatus.PENDING.value
        )
        return chain.status, chain.attempts


def mark_enqueued(sessions: Sessions, chain_ids: Sequence[int]) -> None:
    now = utcnow()
    with sessions.begin() as s:
        for start in range(0, len(chain_ids), 1000):
            s.execute(
                update(Chain)
                .where(Chain.id.in_(chain_ids[start : start + 1000]), Chain.status.not_in(FINAL))
                .values(enqueued_at=now, updated_at=now)
            )


# ---- scheduling queries --------------------------------------------------------------------


def unfinished_chains(
    sessions: Sessions, sweep_id: int, retry_failed: bool = False
) -> list[tuple[int, int]]:
    """(chain id, next step) of every chain of the sweep that still has steps to take."""
    statuses = [ChainStatus.PENDING.value, ChainStatus.RUNNING.value]
    with sessions.begin() as s:
        if retry_failed:
            s.execute(
                update(Chain)
                .where(
                    Chain.status == ChainStatus.FAILED.value,
                    Chain.run_id.in_(select(Run.id).where(Run.sweep_id == sweep_id)),
                )
                .values(status=ChainStatus.PENDING.value, attempts=0, updated_at=utcnow())
            )
        rows = s.execute(
            select(Chain.id, Chain.current_step)
            .join(Run, Run.id == Chain.run_id)
            .where(Run.sweep_id == sweep_id, Chain.status.in_(statuses))
            .order_by(Chain.id)
        ).all()
    return [(cid, cur + 1) for cid, cur in rows]


DEFAULT_STALL_TIMEOUT = 600.0


def stalled_chains(
    sessions: Sessions, older_than: dt.timedelta | None = None
) -> list[tuple[int, int]]:
    """Unfinished chains of active sweeps untouched for longer than `older_than`, or, when it
    is None, than their own sweep's `execution.stall_timeout`."""
    with sessions() as s:
        sweeps = s.execute(
            select(Sweep.id, Sweep.config).where(Sweep.status == SweepStatus.ACTIVE.value)
        ).all()
        out: list[tuple[int, int]] = []
        now = utcnow()
        for sweep_id, config in sweeps:
            if older_than is None:
                execution = (config or {}).get("execution") or {}
                limit = dt.timedelta(
                    seconds=float(execution.get("stall_timeout", DEFAULT_STALL_TIMEOUT))
                )
            else:
                limit = older_than
            rows = s.execute(
                select(Chain.id, Chain.current_step)
                .join(Run, Run.id == Chain.run_id)
                .where(
                    Run.sweep_id == sweep_id,
                    Chain.status.in_([ChainStatus.PENDING.value, ChainStatus.RUNNING.value]),
                    Chain.updated_at < now - limit,
                )
                .order_by(Chain.id)
            ).all()
            out.extend((cid, cur + 1) for cid, cur in rows)
    return out


def cancel_sweep(sessions: Sessions, sweep_id: int) -> int:
    """Stop a sweep: it and its unfinished chains become `cancelled`; returns chains cancelled."""
    with sessions.begin() as s:
        s.execute(
            update(Sweep).where(Sweep.id == sweep_id).values(status=SweepStatus.CANCELLED.value)
        )
        return _rowcount(
            s,
            update(Chain)
            .where(
                Chain.run_id.in_(select(Run.id).where(Run.sweep_id == sweep_id)),
                Chain.status.not_in(FINAL),
            )
            .values(status=ChainStatus.CANCELLED.value, updated_at=utcnow()),
        )


def reactivate_sweep(sessions: Sessions, sweep_id: int) -> None:
    """Undo a cancel: cancelled chains become pending again (used by `resume`)."""
    with sessions.begin() as s:
        s.execute(update(Sweep).where(Sweep.id == sweep_id).values(status=SweepStatus.ACTIVE.value))
        s.execute(
            update(Chain)
            .where(
                Chain.run_id.in_(select(Run.id).where(Run.sweep_id == sweep_id)),
                Chain.status == ChainStatus.CANCELLED.value,
            )
            .values(status=ChainStatus.PENDING.value, updated_at=utcnow())
        )


@dataclass(frozen=True)
class Extension:
    """One run extended by `extend_sweep`."""

    run_id: int
    run: str
    old_steps: int
    new_steps: int
    reopened: int  # finished chains that have steps to take again
    failed: int  # failed chains, left failed (`--retry-failed` revives them)


def extend_sweep(
    sessions: Sessions, sweep_id: int, steps: int, runs: Sequence[str] | None = None
) -> list[Extension]:
    """Raise the steps per chain of the sweep's runs (all, or those named or numbered in
    `runs`) to `steps`, in one transaction, and record each in `sweep_extensions`.

    Every chain of a run gets the new target; `done` chains become `pending` again (or
    `cancelled`, when the sweep is cancelled: resuming it continues them); `failed` chains
    stay failed. The runs' `steps` (column and config) become `steps`; their names keep the
    steps they were created with. Nothing is enqueued here. `ExtendError` when a named run is
    unknown, a run is ancestral, or `steps` is not above a run's current steps.
    """
    with sessions.begin() as s:
        sweep = s.get(Sweep, sweep_id, with_for_update=True)  # one extension at a time
        if sweep is None:
            raise SweepNotFoundError(f"no sweep with id {sweep_id}")
        all_runs = list(
            s.execute(
                select(Run).where(Run.sweep_id == sweep_id).order_by(Run.grid_index)
            ).scalars()
        )
        chosen = all_runs
        if runs:
            by_ref = {r.name: r for r in all_runs} | {str(r.id): r for r in all_runs}
            unknown = [ref for ref in runs if ref not in by_ref]
            if unknown:
                names = "; ".join(f"{r.id}: {r.name}" for r in all_runs)
                raise ExtendError(
                    f"sweep {sweep.name!r} has no run {unknown[0]!r} (its runs, by id: {names})"
                )
            chosen = list({by_ref[ref].id: by_ref[ref] for ref in runs}.values())
        for r in chosen:
            if r.method == "ancestral":
                raise ExtendError(
                    f"run {r.name!r} of sweep {sweep.name!r} is ancestral (independent samples, "
                    "0 steps): there are no steps to extend"
                )
            if steps <= r.steps:
                raise ExtendError(
                    f"run {r.name!r} of sweep {sweep.name!r} already has {r.steps} steps per "
                    f"chain: --steps must be larger (got {steps}); `qalign sweep resume` or "
                    "`qalign run` continues an extension already made"
                )
        reopen = (
            ChainStatus.CANCELLED.value
            if sweep.status == SweepStatus.CANCELLED.value
            else ChainStatus.PENDING.value
        )
        now = utcnow()
        out = []
        for r in chosen:
            done, failed, steps_done = s.execute(
                select(
                    func.sum(case((Chain.status == ChainStatus.DONE.value, 1), else_=0)),
                    func.sum(case((Chain.status == ChainStatus.FAILED.value, 1), else_=0)),
                    func.sum(Chain.current_step + 1),
                ).where(Chain.run_id == r.id)
            ).one()
            # One statement: a step committing meanwhile either finishes first (and is reopened
            # here) or sees the new target (and stays running); see `commit_step`.
            s.execute(
                update(Chain)
                .where(Chain.run_id == r.id)
                .values(
                    target_steps=steps,
                    status=case(
                        (Chain.status == ChainStatus.DONE.value, reopen), else_=Chain.status
                    ),
                    updated_at=now,
                )
            )
            s.add(
                SweepExtension(
                    sweep_id=sweep_id,
                    run_id=r.id,
                    old_steps=r.steps,
                    new_steps=steps,
                    steps_done=int(steps_done or 0),
                    created_at=now,
                )
            )
            out.append(Extension(r.id, r.name, r.steps, steps, int(done or 0), int(failed or 0)))
            r.steps = steps
            r.config = {**r.config, "steps": steps}
        return out


def sweep_extensions(sessions: Sessions, sweep_id: int) -> list[dict[str, Any]]:
    """The sweep's extension history, oldest first: run, old and new steps, time."""
    with sessions() as s:
        rows = s.execute(
            select(Run.name, SweepExtension.old_steps, SweepExtension.new_steps,
                   SweepExtension.created_at)
            .join(Run, Run.id == SweepExtension.run_id)
            .where(SweepExtension.sweep_id == sweep_id)
            .order_by(SweepExtension.id)
        ).all()  # fmt: skip
    return [
        {"run": name, "old_steps": old, "new_steps": new, "at": at.isoformat()}
        for name, old, new, at in rows
    ]


@dataclass(frozen=True)
class RunStatus:
    """Progress of one run, as shown by `qalign sweep status`."""

    run_id: int
    name: str
    method: str
    chains: int
    chains_done: int
    chains_failed: int
    chains_cancelled: int
    chains_with_errors: int
    steps_total: int
    steps_done: int
    mcmc_proposals: int
    mcmc_accepted: int
    rejected_with_reason: int
    mean_state_reward: float | None  # mean reward of the chains' current states
    first_at: dt.datetime | None
    last_at: dt.datetime | None
    step_errors: int = 0  # failed attempts ever recorded (most were retried successfully)
    error_kinds: dict[str, int] = field(default_factory=dict)
    extended_at: dt.datetime | None = None  # the run's latest `sweep extend`
    steps_done_at_extension: int = 0  # its committed steps at that moment
    chains_converged: int = 0  # retired by `stop_when`
    prompts_converged: int = 0  # prompts whose chains were retired by `stop_when`
    generator_model: str = ""
    beta: float | None = None
    temperature: float | None = None
    steps: int | None = None

    @property
    def acceptance_rate(self) -> float | None:
        return None if self.mcmc_proposals == 0 else self.mcmc_accepted / self.mcmc_proposals


def sweep_status(sessions: Sessions, sweep_id: int) -> list[RunStatus]:
    """Per-run progress from the chains table alone (the step commit keeps its counters)."""
    converged = Chain.status == ChainStatus.CONVERGED.value
    with sessions() as s:
        chain_rows = s.execute(
            select(
                Chain.run_id,
                Run.name,
                Run.method,
                func.count(),
                func.sum(case((Chain.status == ChainStatus.DONE.value, 1), else_=0)),
                func.sum(case((Chain.status == ChainStatus.FAILED.value, 1), else_=0)),
                func.sum(case((Chain.status == ChainStatus.CANCELLED.value, 1), else_=0)),
                func.sum(case((Chain.last_error.is_not(None), 1), else_=0)),
                # a retired chain takes no more steps: its steps are all done
                func.sum(case((converged, Chain.current_step + 1), else_=Chain.target_steps + 1)),
                func.sum(Chain.current_step + 1),
                *finite_mean_columns(Chain.state_reward),
                func.sum(case((Chain.current_step > 0, Chain.current_step), else_=0)),
                func.sum(Chain.accepted_steps),
                func.sum(Chain.rejected_with_reason),
                func.min(Chain.first_step_at),
                func.max(Chain.last_step_at),
                func.sum(case((converged, 1), else_=0)),
                func.count(distinct(case((converged, Chain.prompt_id)))),
                Run.generator_model,
                Run.beta,
                Run.temperature,
                Run.steps,
            )
            .join(Run, Run.id == Chain.run_id)
            .where(Run.sweep_id == sweep_id)
            .group_by(Chain.run_id, Run.name, Run.method, Run.generator_model, Run.beta,
                      Run.temperature, Run.steps)
        ).all()  # fmt: skip
        kinds: dict[int, dict[str, int]] = {}
        for run_id, kind, n in s.execute(
            select(StepError.run_id, StepError.kind, func.count())
            .join(Run, Run.id == StepError.run_id)
            .where(Run.sweep_id == sweep_id)
            .group_by(StepError.run_id, StepError.kind)
        ).all():
            kinds.setdefault(run_id, {})[kind] = int(n)
        latest = (
            select(func.max(SweepExtension.id))
            .where(SweepExtension.sweep_id == sweep_id)
            .group_by(SweepExtension.run_id)
        )
        extended = {
            run_id: (at, done)
            for run_id, at, done in s.execute(
                select(
                    SweepExtension.run_id, SweepExtension.created_at, SweepExtension.steps_done
                ).where(SweepExtension.id.in_(latest))
            ).all()
        }
    out = []
    for row in chain_rows:
        (run_id, name, method, n, done, failed, cancelled, errs, total, steps_done, r_large,
         r_small, r_n, mc, acc, rej, first, last, n_conv, p_conv, model, beta, temp,
         steps) = row  # fmt: skip
        out.append(
            RunStatus(
                run_id=run_id,
                name=name,
                method=method,
                chains=int(n),
                chains_done=int(done or 0),
                chains_failed=int(failed or 0),
                chains_cancelled=int(cancelled or 0),
                chains_with_errors=int(errs or 0),
                steps_total=int(total or 0),
                steps_done=int(steps_done or 0),
                mcmc_proposals=int(mc or 0),
                mcmc_accepted=int(acc or 0),
                rejected_with_reason=int(rej or 0),
                mean_state_reward=finite_mean(r_large, r_small, r_n),
                first_at=first,
                last_at=last,
                step_errors=sum(kinds.get(run_id, {}).values()),
                error_kinds=dict(sorted(kinds.get(run_id, {}).items(), key=lambda kv: -kv[1])),
                extended_at=extended.get(run_id, (None, 0))[0],
                steps_done_at_extension=int(extended.get(run_id, (None, 0))[1]),
                chains_converged=int(n_conv or 0),
                prompts_converged=int(p_conv or 0),
                generator_model=model,
                beta=beta,
                temperature=temp,
                steps=steps,
            )
        )
    return sorted(out, key=lambda r: r.run_id)


def converged_prompts(sessions: Sessions, sweep_id: int) -> dict[int, list[dict[str, int]]]:
    """Per run: the prompts `stop_when` retired, with the step at which (prompt order)."""
    with sessions() as s:
        rows = s.execute(
            select(Chain.run_id, Prompt.prompt_index, func.min(Chain.current_step))
            .join(Prompt, Prompt.id == Chain.prompt_id)
            .join(Run, Run.id == Chain.run_id)
            .where(Run.sweep_id == sweep_id, Chain.status == ChainStatus.CONVERGED.value)
            .group_by(Chain.run_id, Prompt.prompt_index)
            .order_by(Chain.run_id, Prompt.prompt_index)
        ).all()
    out: dict[int, list[dict[str, int]]] = {}
    for run_id, prompt_index, step in rows:
        out.setdefault(int(run_id), []).append(
            {"prompt_index": int(prompt_index), "step": int(step)}
        )
    return out


@dataclass(frozen=True)
class ErrorSummary:
    """Failed step attempts of one run and kind, with the latest message."""

    run_name: str
    kind: str
    count: int
    last_error: str
    last_at: dt.datetime


def error_summary(sessions: Sessions, sweep_id: int) -> list[ErrorSummary]:
    """Per run and error kind: how many attempts failed, and the most recent reason."""
    with sessions() as s:
        groups = s.execute(
            select(StepError.run_id, StepError.kind, func.count(), func.max(StepError.id))
            .join(Run, Run.id == StepError.run_id)
            .where(Run.sweep_id == sweep_id)
            .group_by(StepError.run_id, StepError.kind)
        ).all()
        last_ids = [g[3] for g in groups]
        latest = {
            row.id: row
            for row in s.execute(select(StepError).where(StepError.id.in_(last_ids))).scalars()
        }
        names = dict(s.execute(select(Run.id, Run.name).where(Run.sweep_id == sweep_id)).all())
    out = [
        ErrorSummary(
            run_name=names[run_id],
            kind=kind,
            count=int(n),
            last_error=f"step {latest[last].step}: {latest[last].error}",
            last_at=latest[last].created_at,
        )
        for run_id, kind, n, last in groups
    ]
    return sorted(out, key=lambda e: (e.run_name, -e.count, e.kind))
