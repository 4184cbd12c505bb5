"""Loading checked samples and chain trajectories of a sweep, one run at a time.

Everything here reads: `qalign eval` (`qalign.analysis.evaluate`) must have written the
`answers` first. Counts and per-step aggregates run in SQL; samples and trajectories stream
from one ordered query per run, so memory stays proportional to one run (texts are only loaded
when asked for, e.g. for MBR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, distinct, func, select

from qalign.analysis.predict import ParticleSet, Sample, Trajectory
from qalign.storage.models import Answer, Chain, ChainStatus, Prompt, Proposal, Run, Sweep
from qalign.storage.repo import Sessions, finite_mean, finite_mean_columns

CHAIN_RUN_METHODS = ("qalign", "quest", "power")
STREAM_BATCH = 5000


class AnalysisError(Exception):
    """A sweep cannot be analysed as asked (the message says what to do)."""


class NotEvaluatedError(AnalysisError):
    """Proposals have no checked answer yet: `qalign eval` has not been run (or not since)."""


@dataclass(frozen=True)
class RunInfo:
    """A run of a sweep, as the analysis needs it."""

    id: int
    sweep_id: int
    sweep: str
    name: str
    method: str
    beta: float | None
    temperature: float
    steps: int
    generator_model: str
    reward_model: str | None
    chains_per_prompt: int
    config: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.sweep}/{self.name}"

    @property
    def has_chains(self) -> bool:
        """QAlign / QUEST / power chains (as opposed to the independent samples of `ancestral`
        and the particles of `smc`)."""
        return self.method in CHAIN_RUN_METHODS

    @property
    def is_smc(self) -> bool:
        return self.method == "smc"


@dataclass(frozen=True)
class Coverage:
    """How many proposals of a sweep have a checked answer, and under which task names."""

    proposals: int
    answered: int
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class RunSummary:
    """SQL aggregates of one run's proposals (acceptance over MCMC steps k >= 1 only)."""

    prompts: int
    chains: int
    proposals: int
    mcmc_proposals: int
    acceptance: float | None
    mean_proposal_reward: float | None  # over every proposal (step 0 included), finite ones
    scored: int
    gen_tokens: int
    reward_tokens: int
    correct: int
    answered: int  # proposals with a checked answer
    with_answer: int  # ... whose response had an extractable answer (votable)
    chains_converged: int = 0  # retired by the run's `stop_when`
    prompts_converged: int = 0  # ... and their prompts


def list_runs(sessions: Sessions, sweep_ids: Sequence[int]) -> list[RunInfo]:
    """The runs of the given sweeps, in sweep order then grid order."""
    order = {sid: i for i, sid in enumerate(sweep_ids)}
    with sessions() as s:
        rows = s.execute(
            select(Run, Sweep.name)
            .join(Sweep, Sweep.id == Run.sweep_id)
            .where(Run.sweep_id.in_(list(sweep_ids)))
        ).all()
        out = [
            RunInfo(
                id=r.id,
                sweep_id=r.sweep_id,
                sweep=sweep_name,
                name=r.name,
                method=r.method,
                beta=r.beta,
                temperature=r.temperature,
                steps=r.steps,
                generator_model=r.generator_model,
                reward_model=r.reward_model,
                chains_per_prompt=int(r.config.get("chains_per_prompt", 0)),
                config=dict(r.config),
            )
            for r, sweep_name in rows
        ]
    return sorted(out, key=lambda r: (order[r.sweep_id], r.id))


def answer_coverage(sessions: Sessions, sweep_id: int) -> Coverage:
    """Proposals of the sweep, how many have an answer, and the task names of those answers."""
    with sessions() as s:
        total, answered = s.execute(
            select(func.count(Proposal.id), func.count(Answer.proposal_id))
            .select_from(Proposal)
            .join(Run, Run.id == Proposal.run_id)
            .outerjoin(Answer, Answer.proposal_id == Proposal.id)
            .where(Run.sweep_id == sweep_id)
        ).one()
        tasks = (
            s.execute(
                select(Answer.task)
                .distinct()
                .join(Proposal, Proposal.id == Answer.proposal_id)
                .join(Run, Run.id == Proposal.run_id)
                .where(Run.sweep_id == sweep_id)
                .order_by(Answer.task)
            )
            .scalars()
            .all()
        )
    return Coverage(int(total or 0), int(answered or 0), tuple(tasks))


def require_answers(sessions: Sessions, sweep_id: int, sweep_name: str) -> Coverage:
    """The coverage, or `NotEvaluatedError` unless every proposal has a checked answer."""
    cov = answer_coverage(sessions, sweep_id)
    if cov.proposals == 0:
        raise AnalysisError(f"sweep {sweep_name!r} has no proposals yet: run it first")
    if cov.answered == 0:
        raise NotEvaluatedError(
            f"sweep {sweep_name!r} has no checked answers: run `qalign eval {sweep_name}` first"
        )
    if cov.answered < cov.proposals:
        raise NotEvaluatedError(
            f"sweep {sweep_name!r}: {cov.proposals - cov.answered} of {cov.proposals} proposals "
            f"have no checked answer (the sweep moved on since the last eval): run "
            f"`qalign eval {sweep_name}` again"
        )
    return cov


def _sample(row: Any, *, loose: bool, texts: bool) -> Sample:
    correct = row.correct_loose if loose and row.correct_loose is not None else row.correct
    return Sample(
        answer=row.answer,
        correct=bool(correct),
        reward=math.nan if row.reward is None else float(row.reward),
        gen_tokens=int(row.gen_tokens or 0),
        reward_tokens=int(row.reward_tokens or 0),
        text=row.text if texts else "",
        gen_seconds=row.generator_seconds,
        reward_seconds=row.reward_seconds,
    )


def _columns(texts: bool) -> list[Any]:
    cols: list[Any] = [
        Proposal.chain_id,
        Prompt.prompt_index,
        Chain.chain_index,
        Proposal.step,
        Proposal.accepted,
        Proposal.reward,
        Proposal.gen_tokens,
        Proposal.reward_tokens,
        Proposal.generator_seconds,
        Proposal.reward_seconds,
        Answer.proposal_id.label("answer_id"),
        Answer.answer,
        Answer.correct,
        Answer.correct_loose,
    ]
    if texts:
        cols.append(Proposal.text)
    return cols


def _missing(run_id: int, row: Any) -> NotEvaluatedError:
    return NotEvaluatedError(
        f"run {run_id}: the proposal of chain {row.chain_id} step {row.step} has no checked "
        "answer: run `qalign eval` on its sweep"
    )


def load_samples(
    sessions: Sessions, run_id: int, *, loose: bool = False, texts: bool = False
) -> dict[int, list[Sample]]:
    """The independent samples of a run (each chain's step 0), by prompt index, in chain order.

    For an `ancestral` run these are its samples; for a chain run, the chains' initial samples.
    `loose` takes IFEval's loose verdict where there is one.
    """
    q = (
        select(*_columns(texts))
        .select_from(Proposal)
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .outerjoin(Answer, Answer.proposal_id == Proposal.id)
        .where(Proposal.run_id == run_id, Proposal.step == 0)
        .order_by(Prompt.prompt_index, Chain.chain_index)
    )
    out: dict[int, list[Sample]] = {}
    with sessions() as s:
        for part in s.execute(q.execution_options(yield_per=STREAM_BATCH)).partitions():
            for row in part:
                if row.answer_id is None:
                    raise _missing(run_id, row)
                out.setdefault(row.prompt_index, []).append(_sample(row, loose=loose, texts=texts))
    return out


class _ChainWalk:
    """Accumulates one chain's proposals (in step order) into its trajectory."""

    def __init__(self, run_id: int, prompt_index: int, chain_index: int) -> None:
        self.run_id = run_id
        self.prompt_index = prompt_index
        self.chain_index = chain_index
        self.states: list[Sample] = []
        self.gen: list[int] = []
        self.rm: list[int] = []
        self.secs: list[float] | None = []  # None once a step has no measurement
        self.accepted: list[bool] = []
        self.broken = False

    def add(self, row: Any, *, loose: bool, texts: bool) -> None:
        if self.broken or row.step != len(self.states):
            self.broken = True  # a gap: keep the contiguous prefix only
            return
        accepted = bool(row.accepted) or row.step == 0
        if accepted:
            if row.answer_id is None:
                raise _missing(self.run_id, row)
            state = _sample(row, loose=loose, texts=texts)
        else:
            state = self.states[-1]
        gen_prev = self.gen[-1] if self.gen else 0
        rm_prev = self.rm[-1] if self.rm else 0
        self.states.append(state)
        self.gen.append(gen_prev + int(row.gen_tokens or 0))
        self.rm.append(rm_prev + int(row.reward_tokens or 0))
        if self.secs is not None:
            if row.generator_seconds is None or row.reward_seconds is None:
                self.secs = None
            else:
                prev = self.secs[-1] if self.secs else 0.0
                self.secs.append(prev + row.generator_seconds + row.reward_seconds)
        self.accepted.append(accepted)

    def trajectory(self) -> Trajectory:
        return Trajectory(
            states=tuple(self.states),
            cum_gen_tokens=tuple(self.gen),
            cum_reward_tokens=tuple(self.rm),
            accepted=tuple(self.accepted),
            cum_seconds=None if self.secs is None else tuple(self.secs),
        )


def load_trajectories(
    sessions: Sessions, run_id: int, *, loose: bool = False, texts: bool = False
) -> dict[int, list[Trajectory]]:
    """Every chain of a run as a `Trajectory`, by prompt index, in chain order.

    The state after step k is the last accepted proposal at or before k (step 0 always counts
    as accepted); token counts accumulate the proposals' own counts (generated tokens, reward
    model tokens). A chain still running gives the steps it has committed.
    """
    q = (
        select(*_columns(texts))
        .select_from(Proposal)
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .outerjoin(Answer, Answer.proposal_id == Proposal.id)
        .where(Proposal.run_id == run_id)
        .order_by(Proposal.chain_id, Proposal.step)
    )
    walks: list[_ChainWalk] = []
    current: _ChainWalk | None = None
    current_id: int | None = None
    with sessions() as s:
        for part in s.execute(q.execution_options(yield_per=STREAM_BATCH)).partitions():
            for row in part:
                if row.chain_id != current_id:
                    current = _ChainWalk(run_id, row.prompt_index, row.chain_index)
                    current_id = row.chain_id
                    walks.append(current)
                assert current is not None
                current.add(row, loose=loose, texts=texts)
    out: dict[int, list[Trajectory]] = {}
    for w in sorted(walks, key=lambda w: (w.prompt_index, w.chain_index)):
        if w.states:
            out.setdefault(w.prompt_index, []).append(w.trajectory())
    return out


def load_particles(
    sessions: Sessions, run_id: int, final_block: int, *, loose: bool = False, texts: bool = False
) -> dict[int, ParticleSet]:
    """Each prompt's final SMC particles (their rows at block `final_block`, in chain order) and
    the cost of every block row of the prompt, by prompt index.

    A particle that failed for good before the last block has no final row: it is left out of
    the vote, but the blocks it committed still count in the cost.
    """
    q = (
        select(*_columns(texts), Proposal.log_weight)
        .select_from(Proposal)
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .outerjoin(Answer, Answer.proposal_id == Proposal.id)
        .where(Proposal.run_id == run_id)
        .order_by(Prompt.prompt_index, Chain.chain_index, Proposal.step)
    )
    finals: dict[int, list[tuple[Sample, float]]] = {}
    cost: dict[int, list[Any]] = {}  # [gen tokens, reward tokens, seconds or None]
    with sessions() as s:
        for part in s.execute(q.execution_options(yield_per=STREAM_BATCH)).partitions():
            for row in part:
                c = cost.setdefault(row.prompt_index, [0, 0, 0.0])
                c[0] += int(row.gen_tokens or 0)
                c[1] += int(row.reward_tokens or 0)
                if c[2] is not None:
                    measured = row.generator_seconds is not None and row.reward_seconds is not None
                    c[2] = c[2] + row.generator_seconds + row.reward_seconds if measured else None
                if row.step != final_block:
                    continue
                if row.answer_id is None:
                    raise _missing(run_id, row)
                weight = -math.inf if row.log_weight is None else float(row.log_weight)
                finals.setdefault(row.prompt_index, []).append(
                    (_sample(row, loose=loose, texts=texts), weight)
                )
    return {
        k: ParticleSet(
            particles=tuple(p for p, _ in finals.get(k, [])),
            log_weights=tuple(w for _, w in finals.get(k, [])),
            gen_tokens=gen,
            reward_tokens=rm,
            seconds=secs,
        )
        for k, (gen, rm, secs) in sorted(cost.items())
    }


def acceptance_by_step(sessions: Sessions, run_id: int) -> list[tuple[int, float, int]]:
    """(step, acceptance rate, proposals) for every MCMC step k >= 1 of a run (SQL aggregate)."""
    with sessions() as s:
        rows = s.execute(
            select(
                Proposal.step,
                func.avg(case((Proposal.accepted, 1.0), else_=0.0)),
                func.count(),
            )
            .where(Proposal.run_id == run_id, Proposal.step > 0)
            .group_by(Proposal.step)
            .order_by(Proposal.step)
        ).all()
    return [(int(k), float(a), int(n)) for k, a, n in rows]


def run_summary(sessions: Sessions, run_id: int) -> RunSummary:
    """Prompts, chains, proposals, acceptance, mean reward of proposals, tokens and correct
    proposals."""
    mcmc = Proposal.step > 0
    with sessions() as s:
        row = s.execute(
            select(
                func.count(Proposal.id),
                func.sum(case((mcmc, 1), else_=0)),
                func.sum(case((and_(mcmc, Proposal.accepted), 1), else_=0)),
                *finite_mean_columns(Proposal.reward),
                func.count(Proposal.reward),
                func.sum(Proposal.gen_tokens),
                func.sum(Proposal.reward_tokens),
                func.sum(case((Answer.correct, 1), else_=0)),
                func.count(Answer.proposal_id),
                func.count(Answer.answer),
            )
            .select_from(Proposal)
            .outerjoin(Answer, Answer.proposal_id == Proposal.id)
            .where(Proposal.run_id == run_id)
        ).one()
        converged = Chain.status == ChainStatus.CONVERGED.value
        chains, prompts, n_conv, p_conv = s.execute(
            select(
                func.count(Chain.id),
                func.count(distinct(Chain.prompt_id)),
                func.sum(case((converged, 1), else_=0)),
                func.count(distinct(case((converged, Chain.prompt_id)))),
            ).where(Chain.run_id == run_id)
        ).one()
    n, mc, acc, r_large, r_small, r_n, scored, gen, rm, correct, answered, with_answer = row
    return RunSummary(
        prompts=int(prompts or 0),
        chains=int(chains or 0),
        proposals=int(n or 0),
        mcmc_proposals=int(mc or 0),
        acceptance=(int(acc or 0) / int(mc)) if mc else None,
        mean_proposal_reward=finite_mean(r_large, r_small, r_n),
        scored=int(scored or 0),
        gen_tokens=int(gen or 0),
        reward_tokens=int(rm or 0),
        correct=int(correct or 0),
        answered=int(answered or 0),
        with_answer=int(with_answer or 0),
        chains_converged=int(n_conv or 0),
        prompts_converged=int(p_conv or 0),
    )


__all__ = [
    "CHAIN_RUN_METHODS",
    "AnalysisError",
    "Coverage",
    "NotEvaluatedError",
    "RunInfo",
    "RunSummary",
    "acceptance_by_step",
    "answer_coverage",
    "list_runs",
    "load_particles",
    "load_samples",
    "load_trajectories",
    "require_answers",
    "run_summary",
]
