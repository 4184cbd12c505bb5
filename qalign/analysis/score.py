"""`qalign score`: reward-score a sweep's stored samples, each distinct response once per prompt.

Used for ancestral baselines sampled without a reward model (or to rescore them with another
one). Proposals are grouped by (prompt, response text); each group is scored once and the score
and reward-token count are written to every proposal of the group, and to the state of the
chains those proposals are (for ancestral runs, step 0 is the chain's state).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from sqlalchemy import select, update

from qalign.analysis.data import AnalysisError
from qalign.clients.base import score_with_tokens
from qalign.clients.registry import ClientRegistry
from qalign.clients.spec import RewardSpec
from qalign.sampling.step import reward_conversation
from qalign.storage.models import Chain, Prompt, Proposal, Run
from qalign.storage.repo import Sessions

BATCH = 256


def _pending(
    sessions: Sessions, sweep_id: int, force: bool
) -> tuple[dict[tuple[int, str], list[int]], dict[int, list[dict[str, Any]]], dict[int, int]]:
    q = (
        select(Proposal.id, Proposal.text, Chain.prompt_id, Proposal.step, Proposal.chain_id)
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Run, Run.id == Proposal.run_id)
        .where(Run.sweep_id == sweep_id, Proposal.reject_reason.is_(None))
    )
    if not force:
        q = q.where(Proposal.reward.is_(None))
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    step0_chain: dict[int, int] = {}
    with sessions() as s:
        for pid, text, prompt_id, step, chain_id in s.execute(q):
            groups[(prompt_id, text)].append(pid)
            if step == 0:
                step0_chain[pid] = chain_id
        prompt_ids = {k[0] for k in groups}
        messages: dict[int, list[dict[str, Any]]] = dict(
            s.execute(select(Prompt.id, Prompt.messages).where(Prompt.id.in_(prompt_ids))).all()
        )
    return groups, messages, step0_chain


def reward_section(sessions: Sessions, sweep_id: int) -> RewardSpec | None:
    """The sweep's own reward model, if it has one."""
    with sessions() as s:
        configs = s.execute(select(Run.config).where(Run.sweep_id == sweep_id)).scalars().all()
    sections = [c["reward"] for c in configs if c.get("reward")]
    return RewardSpec.from_config(sections[0]) if sections else None


async def score_sweep(
    sessions: Sessions, sweep_id: int, reward: RewardSpec, *, force: bool = False
) -> dict[str, int]:
    """Score every unscored proposal (all of them with `force`); returns counts."""
    groups, messages, step0_chain = _pending(sessions, sweep_id, force)
    registry = ClientRegistry(startup_timeout=60.0)
    keys = list(groups)
    try:
        rm = await registry.reward(reward)
        scored = 0
        for start in range(0, len(keys), BATCH):
            part = keys[start : start + BATCH]
            convs = [reward_conversation(messages[pid], text) for pid, text in part]
            scores, counts = await score_with_tokens(rm, convs)
            with sessions.begin() as s:
                for key, value, n_tok in zip(part, scores, counts, strict=True):
                    finite = value if value == value else None  # NaN is stored as NULL
                    ids = groups[key]
                    s.execute(
                        update(Proposal)
                        .where(Proposal.id.in_(ids))
                        .values(reward=finite, reward_tokens=n_tok)
                    )
                    chains = [step0_chain[i] for i in ids if i in step0_chain]
                    if chains:
                        s.execute(
                            update(Chain)
                            .where(Chain.id.in_(chains), Chain.current_step == 0)
                            .values(state_reward=finite)
                        )
                    scored += len(ids)
    finally:
        await registry.close()
    return {"proposals": scored, "distinct": len(keys)}


def run_score(
    sessions: Sessions, sweep_id: int, reward: RewardSpec | None, *, force: bool = False
) -> dict[str, int]:
    """Synchronous entry point; uses the sweep's own reward section unless one is given."""
    section = reward or reward_section(sessions, sweep_id)
    if section is None:
        raise AnalysisError(
            "this sweep has no reward model; pass --reward-url and --reward-model to score it"
        )
    return asyncio.run(score_sweep(sessions, sweep_id, section, force=force))
