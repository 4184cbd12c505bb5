"""SQLAlchemy 2 models: the database is the source of truth for every sweep.

Naming convention for constraints and indexes is fixed so Alembic migrations and the models
agree on every name (and analysts can refer to them).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from qalign.storage.types import UTCDateTime

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class SweepStatus(StrEnum):
    ACTIVE = "active"
    CANCELLED = "cancelled"


class ChainStatus(StrEnum):
    """Lifecycle of a chain. Only `done`, `failed`, `cancelled` and `converged` are final."""

    PENDING = "pending"  # created or re-enqueued, waiting for a worker
    RUNNING = "running"  # a worker has taken its next step
    DONE = "done"  # current_step == target_steps
    FAILED = "failed"  # a step failed `max_attempts` times; `resume --retry-failed` revives it
    CANCELLED = "cancelled"
    # retired by the run's `stop_when` at `current_step`, a checkpoint where its prompt's
    # chains had converged; it takes no further steps (`sweep extend` leaves it so)
    CONVERGED = "converged"


class Sweep(Base):
    """A named experiment: one validated config, expanded into runs."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=SweepStatus.ACTIVE.value)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Run(Base):
    """One point of a sweep's grid, with its fully resolved config."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("sweep_id", "grid_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    grid_index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(500))
    method: Mapped[str] = mapped_column(String(20))
    beta: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    generator_model: Mapped[str] = mapped_column(String(300))
    reward_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Prompt(Base):
    """A dataset row of a sweep: the chat messages and the reference answer."""

    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("sweep_id", "prompt_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    prompt_index: Mapped[int] = mapped_column(Integer)
    messages: Mapped[list[Any]] = mapped_column(JSON)
    reference: Mapped[str | None] = mapped_column(Text, nullable=True)
    row: Mapped[dict[str, Any]] = mapped_column(JSON)


class PromptEncoding(Base):
    """A prompt's chat-templated token ids under one generator model (written once, by step 0)."""

    __tablename__ = "prompt_encodings"
    __table_args__ = (UniqueConstraint("prompt_id", "model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(300))
    token_ids: Mapped[list[Any]] = mapped_column(JSON)
    n_tokens: Mapped[int] = mapped_column(Integer)


class Chain(Base):
    """One Markov chain (or, for `ancestral` runs, one independent sample with 0 steps).

    `current_step` is the last committed step (-1 before step 0). The state columns mirror the
    last accepted proposal; moving a chain is a compare-and-set on `current_step`.
    """

    __tablename__ = "chains"
    __table_args__ = (
        UniqueConstraint("run_id", "prompt_id", "chain_index"),
        Index("ix_chains_run_id_status", "run_id", "status"),
        Index("ix_chains_status_updated_at", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    chain_index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    rng_key: Mapped[str] = mapped_column(String(100))
    target_steps: Mapped[int] = mapped_column(Integer)
    current_step: Mapped[int] = mapped_column(Integer, default=-1)
    status: Mapped[str] = mapped_column(String(20), default=ChainStatus.PENDING.value)
    state_tokens: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    state_logprobs: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    state_reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    state_finish: Mapped[str | None] = mapped_column(String(10), nullable=True)
    state_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    # Kept by the step commit so `sweep status` never aggregates the proposals table.
    accepted_steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rejected_with_reason: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    first_step_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_step_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # A warm-started chain (`warm_start` in the sweep config): the chain of the other sweep whose
    # state at `source_step` (its last step) is this chain's step 0. NULL for every other chain.
    source_chain_id: Mapped[int | None] = mapped_column(
        ForeignKey("chains.id", ondelete="SET NULL"), nullable=True, index=True
    )
    source_step: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Proposal(Base):
    """Append-only: the proposal made at (chain, step) and what was decided. Step 0 is the
    chain's initial sample (always accepted); for ancestral runs it is the sample.

    The full response is `state before the step`[:cut] + `new_tokens`; `response_len` is its
    length. `reward` is NULL when it was NaN or when the proposal was never scored.
    """

    __tablename__ = "proposals"
    __table_args__ = (
        UniqueConstraint("chain_id", "step"),
        Index("ix_proposals_run_id_step", "run_id", "step"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    chain_id: Mapped[int] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    cut: Mapped[int] = mapped_column(Integer)
    new_tokens: Mapped[list[Any]] = mapped_column(JSON)
    response_len: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    log_a: Mapped[float | None] = mapped_column(Float, nullable=True)
    alpha: Mapped[float] = mapped_column(Float)
    accepted: Mapped[bool] = mapped_column(Boolean)
    finish: Mapped[str] = mapped_column(String(10))
    reject_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    gen_seed: Mapped[int] = mapped_column(BigInteger)
    gen_tokens: Mapped[int] = mapped_column(Integer)
    reward_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gen_latency_ms: Mapped[float] = mapped_column(Float)
    reward_latency_ms: Mapped[float] = mapped_column(Float)
    endpoint: Mapped[str] = mapped_column(String(300))
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # a composite reward's terms by name (raw, unweighted; non-finite ones as null)
    reward_terms: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Wall-clock cost of the step (NULL on rows from before migration 0007): seconds spent on
    # the generator's requests, on reward scoring (0 for an in-process cache hit), and waiting
    # between becoming runnable and getting a concurrency slot (see README "Wall-clock cost").
    generator_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    queue_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # SMC runs: the particle's log weight after this block (NULL for other methods, and for a
    # particle whose weight is zero: a non-finite reward)
    log_weight: Mapped[float | None] = mapped_column(Float, nullable=True)


class StepError(Base):
    """Append-only: one failed attempt at a chain step, with its reason (kept after the step
    succeeds, unlike `chains.last_error`, so `sweep status` can say what went wrong)."""

    __tablename__ = "step_errors"
    __table_args__ = (Index("ix_step_errors_run_id_kind", "run_id", "kind"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    chain_id: Mapped[int] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(80))
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SweepExtension(Base):
    """Append-only: one `qalign sweep extend` of one run, from `old_steps` to `new_steps` per
    chain. `steps_done` is the run's committed steps at that moment (for the throughput since)."""

    __tablename__ = "sweep_extensions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    old_steps: Mapped[int] = mapped_column(Integer)
    new_steps: Mapped[int] = mapped_column(Integer)
    steps_done: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Answer(Base):
    """The checked answer of one proposal's response (written by `qalign eval`, replaceable)."""

    __tablename__ = "answers"

    proposal_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("proposals.id", ondelete="CASCADE"),
        primary_key=True,
    )
    task: Mapped[str] = mapped_column(String(40))
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    correct: Mapped[bool] = mapped_column(Boolean)
    correct_loose: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    checked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SmcResample(Base):
    """Append-only: the resampling barrier of one prompt of an SMC run after block `block`.

    Its primary key is the barrier's compare-and-set: the first particle to insert it resamples
    (and writes the `smc_ancestry` rows in the same transaction); every other one reads it.
    """

    __tablename__ = "smc_resamples"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    prompt_id: Mapped[int] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True
    )
    block: Mapped[int] = mapped_column(Integer, primary_key=True)
    particles: Mapped[int] = mapped_column(Integer)  # the live particles resampled
    ess: Mapped[float] = mapped_column(Float)  # before resampling
    resampled: Mapped[bool] = mapped_column(Boolean)  # False: ESS was over the threshold
    u: Mapped[float] = mapped_column(Float)  # the systematic-resampling uniform
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SmcAncestry(Base):
    """Append-only: particle `chain_id` starts block `block` from `parent_chain_id`'s state
    after block `block` - 1, with log weight `log_weight` (NULL: zero weight).

    The state is copied here because the parent moves on; genealogies are recursive queries
    over (chain_id, block) -> (parent_chain_id, block - 1), see the README.
    """

    __tablename__ = "smc_ancestry"
    __table_args__ = (Index("ix_smc_ancestry_run_id_prompt_id_block", "run_id", "prompt_id",
                            "block"),)  # fmt: skip

    chain_id: Mapped[int] = mapped_column(
        ForeignKey("chains.id", ondelete="CASCADE"), primary_key=True
    )
    block: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    parent_chain_id: Mapped[int] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"))
    log_weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    state_tokens: Mapped[list[Any]] = mapped_column(JSON)
    state_reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    state_finish: Mapped[str] = mapped_column(String(10))
    state_text: Mapped[str] = mapped_column(Text)


__all__ = [
    "Answer",
    "Base",
    "Chain",
    "ChainStatus",
    "Prompt",
    "PromptEncoding",
    "Proposal",
    "Run",
    "SmcAncestry",
    "SmcResample",
    "StepError",
    "Sweep",
    "SweepExtension",
    "SweepStatus",
    "func",
]
