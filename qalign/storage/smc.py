"""SMC rows: a prompt's particles at a block, and the resampling barrier's compare-and-set."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from qalign.storage.models import Chain, Proposal, SmcAncestry, SmcResample, utcnow
from qalign.storage.repo import FINAL, Sessions


@dataclass(frozen=True)
class Particle:
    """A particle of a prompt right after block `block` (its chain's stored state)."""

    chain_id: int
    rng_key: str
    current_step: int
    status: str
    state_tokens: tuple[int, ...]
    state_reward: float | None
    state_finish: str
    state_text: str
    log_weight: float  # -inf: zero weight (a non-finite reward, or no block row)

    @property
    def live(self) -> bool:
        return self.status not in FINAL


@dataclass(frozen=True)
class Ancestor:
    """Where a particle starts block `block`: its parent's state after block `block` - 1."""

    parent_chain_id: int
    log_weight: float
    state_tokens: tuple[int, ...]
    state_reward: float
    state_finish: str
    state_text: str


def _weight(x: float | None) -> float:
    return -math.inf if x is None else float(x)


def ancestor(sessions: Sessions, chain_id: int, block: int) -> Ancestor | None:
    """The stored start of particle `chain_id` at `block`, or None before its barrier ran."""
    with sessions() as s:
        row = s.get(SmcAncestry, (chain_id, block))
        if row is None:
            return None
        return Ancestor(
            parent_chain_id=row.parent_chain_id,
            log_weight=_weight(row.log_weight),
            state_tokens=tuple(row.state_tokens),
            state_reward=math.nan if row.state_reward is None else row.state_reward,
            state_finish=row.state_finish,
            state_text=row.state_text,
        )


def particles(sessions: Sessions, run_id: int, prompt_id: int, block: int) -> list[Particle]:
    """The prompt's chains in chain order, with their state and their log weight at `block`.

    The state is the chain's current one, i.e. after block `block` for a chain whose
    `current_step` is `block` (the barrier only reads them while none has moved past).
    """
    with sessions() as s:
        rows = s.execute(
            select(Chain.id, Chain.rng_key, Chain.current_step, Chain.status, Chain.state_tokens,
                   Chain.state_reward, Chain.state_finish, Chain.state_text, Proposal.log_weight)
            .outerjoin(Proposal, (Proposal.chain_id == Chain.id) & (Proposal.step == block))
            .where(Chain.run_id == run_id, Chain.prompt_id == prompt_id)
            .order_by(Chain.chain_index)
        ).all()  # fmt: skip
    return [
        Particle(int(c), str(k), int(cur), str(st), tuple(toks or ()), r, str(fin or "length"),
                 str(text or ""), _weight(lw))
        for c, k, cur, st, toks, r, fin, text, lw in rows
    ]  # fmt: skip


@dataclass(frozen=True)
class Barrier:
    """A resampling decision to store: the barrier row and one ancestry row per particle."""

    run_id: int
    prompt_id: int
    block: int  # the block whose weights were resampled; the children start block + 1
    ess: float
    resampled: bool
    u: float
    children: Sequence[tuple[int, Particle, float]]  # (child chain id, parent, start log weight)


def record_barrier(sessions: Sessions, barrier: Barrier) -> bool:
    """Insert the barrier and its ancestry in one transaction; False if another particle won.

    The primary key of `smc_resamples` is the compare-and-set: a resampling exists at most once
    per (run, prompt, block), and with it all of its ancestry rows or none.
    """
    try:
        with sessions.begin() as s:
            s.add(
                SmcResample(
                    run_id=barrier.run_id, prompt_id=barrier.prompt_id, block=barrier.block,
                    particles=len(barrier.children), ess=barrier.ess,
                    resampled=barrier.resampled, u=barrier.u, created_at=utcnow(),
                )
            )  # fmt: skip
            s.flush()  # the conflict surfaces here, before any ancestry row
            for child, parent, log_weight in barrier.children:
                s.add(
                    SmcAncestry(
                        chain_id=child,
                        block=barrier.block + 1,
                        run_id=barrier.run_id,
                        prompt_id=barrier.prompt_id,
                        parent_chain_id=parent.chain_id,
                        log_weight=log_weight if math.isfinite(log_weight) else None,
                        state_tokens=list(parent.state_tokens),
                        state_reward=parent.state_reward,
                        state_finish=parent.state_finish,
                        state_text=parent.state_text,
                    )
                )
    except IntegrityError:
        return False
    return True
