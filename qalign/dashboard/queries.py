"""The dashboard's SQL reads: aggregates over the chains table and bounded lists, never a scan of
every proposal (that is `analysis.py`'s job, off the request path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select

from qalign.analysis.progress import eta, throughput
from qalign.analysis.progress import utc as _utc
from qalign.storage import repo
from qalign.storage.models import Chain, ChainStatus, Prompt, Proposal, Run, StepError, Sweep
from qalign.storage.repo import Sessions, finite_mean, finite_mean_columns

# Latency columns another change adds to `proposals`; shown when the model has them.
OPTIONAL_LATENCY = ("generator_seconds", "reward_seconds", "queue_seconds")
CHAIN_PAGE_LIMIT = 1000  # proposals shown on a chain page (the latest ones beyond that)
CHAIN_LIST_LIMIT = 200  # chains listed for one prompt on a run page
PROMPT_LIMIT = 500  # prompts listed on a run page


class NotFoundError(LookupError):
    """No sweep, run or chain with that id."""


# A chain retired by `stop_when` is finished, and its steps are all done (as in `sweep status`).
_CONVERGED = Chain.status == ChainStatus.CONVERGED.value
_FINISHED = case(
    (Chain.status.in_((ChainStatus.DONE.value, ChainStatus.CONVERGED.value)), 1), else_=0
)
_TARGET = case((_CONVERGED, Chain.current_step + 1), else_=Chain.target_steps + 1)


def sweeps_overview(sessions: Sessions) -> list[dict[str, Any]]:
    """Every sweep with its chain counts, steps, failures, steps/s and ETA."""
    with sessions() as s:
        sweeps = s.execute(
            select(Sweep.id, Sweep.name, Sweep.status, Sweep.created_at).order_by(Sweep.id)
        ).all()
        agg = {
            row[0]: row[1:]
            for row in s.execute(
                select(
                    Run.sweep_id,
                    func.count(func.distinct(Run.id)),
                    func.count(Chain.id),
                    func.sum(_FINISHED),
                    func.sum(case((Chain.status == ChainStatus.FAILED.value, 1), else_=0)),
                    func.sum(case((Chain.status == ChainStatus.RUNNING.value, 1), else_=0)),
                    func.sum(_TARGET),
                    func.sum(Chain.current_step + 1),
                    func.min(Chain.first_step_at),
                    func.max(Chain.last_step_at),
                )
                .join(Chain, Chain.run_id == Run.id)
                .group_by(Run.sweep_id)
            ).all()
        }
        errors = dict(
            s.execute(
                select(Run.sweep_id, func.count(StepError.id))
                .join(StepError, StepError.run_id == Run.id)
                .group_by(Run.sweep_id)
            ).all()
        )
    out = []
    for sid, name, status, created in sweeps:
        runs, chains, done, failed, running, total, steps, first, last = agg.get(
            sid, (0, 0, 0, 0, 0, 0, 0, None, None)
        )
        steps, total = int(steps or 0), int(total or 0)
        rate = throughput(steps, first, last)
        finished = int(done or 0) + int(failed or 0) == int(chains or 0)
        out.append(
            {
                "id": sid,
                "name": name,
                "status": "finished" if status == "active" and chains and finished else status,
                "created_at": _utc(created),
                "runs": int(runs or 0),
                "chains": int(chains or 0),
                "chains_done": int(done or 0),
                "chains_failed": int(failed or 0),
                "chains_running": int(running or 0),
                "steps_done": steps,
                "steps_total": total,
                "step_errors": int(errors.get(sid, 0)),
                "steps_per_s": rate,
                "eta_s": eta(total - steps, rate),
                "last_step_at": _utc(last),
            }
        )
    return out


def sweep_row(sessions: Sessions, sweep_id: int) -> Sweep:
    with sessions() as s:
        sweep = s.get(Sweep, sweep_id)
    if sweep is None:
        raise NotFoundError(f"no sweep with id {sweep_id}")
    return sweep


def failure_reasons(sessions: Sessions, sweep_id: int) -> dict[int, dict[str, int]]:
    """Per run: failed chains by their recorded error."""
    out: dict[int, dict[str, int]] = {}
    with sessions() as s:
        for run_id, error, n in s.execute(
            select(Chain.run_id, Chain.last_error, func.count(Chain.id))
            .join(Run, Run.id == Chain.run_id)
            .where(Run.sweep_id == sweep_id, Chain.status == ChainStatus.FAILED.value)
            .group_by(Chain.run_id, Chain.last_error)
        ):
            out.setdefault(run_id, {})[error or "(none recorded)"] = int(n)
    return out


def sweep_runs(sessions: Sessions, sweep_id: int) -> list[dict[str, Any]]:
    """One row per run: its grid values, progress, acceptance, state reward and failures."""
    with sessions() as s:
        runs = {
            r.id: r for r in s.execute(select(Run).where(Run.sweep_id == sweep_id)).scalars().all()
        }
    failures = failure_reasons(sessions, sweep_id)
    out = []
    for r in repo.sweep_status(sessions, sweep_id):
        run = runs[r.run_id]
        rate = throughput(
            r.steps_done, r.first_at, r.last_at, r.extended_at, r.steps_done_at_extension
        )
        out.append(
            {
                "run_id": r.run_id,
                "grid_index": run.grid_index,
                "name": run.name,
                "method": run.method,
                "model": run.generator_model,
                "beta": run.beta,
                "temperature": run.temperature,
                "steps": run.steps,
                "chains": r.chains,
                "chains_done": r.chains_done,
                "chains_failed": r.chains_failed,
                "steps_done": r.steps_done,
                "steps_total": r.steps_total,
                "acceptance_rate": r.acceptance_rate,
                "state_reward": r.mean_state_reward,
                "chains_converged": r.chains_converged,
                "prompts_converged": r.prompts_converged,
                "step_errors": r.error_kinds,
                "failed_by_reason": failures.get(r.run_id, {}),
                "steps_per_s": rate,
                "eta_s": eta(r.steps_total - r.steps_done, rate),
            }
        )
    return sorted(out, key=lambda row: row["grid_index"])


def run_row(sessions: Sessions, run_id: int) -> tuple[Run, Sweep]:
    with sessions() as s:
        row = s.execute(
            select(Run, Sweep).join(Sweep, Sweep.id == Run.sweep_id).where(Run.id == run_id)
        ).first()
    if row is None:
        raise NotFoundError(f"no run with id {run_id}")
    return row[0], row[1]


@dataclass(frozen=True)
class Fingerprint:
    """Changes whenever a step of the run commits (so cached analyses know they are stale)."""

    chains: int
    steps: int
    last_step_at: str | None


def run_fingerprint(sessions: Sessions, run_id: int) -> Fingerprint:
    return run_totals(sessions, run_id)["fingerprint"]  # type: ignore[no-any-return]


def run_totals(sessions: Sessions, run_id: int) -> dict[str, Any]:
    """A run's progress, acceptance and state reward from its chains, and its `Fingerprint`."""
    with sessions() as s:
        n, steps, total, mcmc, acc, r_large, r_small, r_n, last = s.execute(
            select(
                func.count(Chain.id),
                func.sum(Chain.current_step + 1),
                func.sum(_TARGET),
                func.sum(case((Chain.current_step > 0, Chain.current_step), else_=0)),
                func.sum(Chain.accepted_steps),
                *finite_mean_columns(Chain.state_reward),
                func.max(Chain.last_step_at),
            ).where(Chain.run_id == run_id)
        ).one()
    last = _utc(last)
    return {
        "fingerprint": Fingerprint(
            int(n or 0), int(steps or 0), None if last is None else last.isoformat()
        ),
        "chains": int(n or 0),
        "steps_done": int(steps or 0),
        "steps_total": int(total or 0),
        "acceptance_rate": (int(acc or 0) / int(mcmc)) if mcmc else None,
        "state_reward": finite_mean(r_large, r_small, r_n),
    }


def run_prompts(sessions: Sessions, run_id: int) -> list[dict[str, Any]]:
    """Per prompt of the run (from the chains table): chains, progress, acceptance, state reward."""
    with sessions() as s:
        rows = s.execute(
            select(
                Prompt.prompt_index,
                func.count(Chain.id),
                func.sum(_FINISHED),
                func.sum(case((Chain.status == ChainStatus.FAILED.value, 1), else_=0)),
                func.sum(case((Chain.current_step > 0, Chain.current_step), else_=0)),
                func.sum(Chain.accepted_steps),
                *finite_mean_columns(Chain.state_reward),
            )
            .join(Prompt, Prompt.id == Chain.prompt_id)
            .where(Chain.run_id == run_id)
            .group_by(Prompt.prompt_index)
            .order_by(Prompt.prompt_index)
            .limit(PROMPT_LIMIT)
        ).all()
    out = []
    for idx, n, done, failed, mcmc, acc, r_large, r_small, r_n in rows:
        out.append(
            {
                "prompt_index": int(idx),
                "chains": int(n),
                "chains_done": int(done or 0),
                "chains_failed": int(failed or 0),
                "acceptance_rate": (int(acc or 0) / int(mcmc)) if mcmc else None,
                "state_reward": finite_mean(r_large, r_small, r_n),
            }
        )
    return out


def prompt_text(sessions: Sessions, run: Run, prompt_index: int) -> str | None:
    """The last user message of a prompt of the run's sweep."""
    with sessions() as s:
        messages = s.execute(
            select(Prompt.messages).where(
                Prompt.sweep_id == run.sweep_id, Prompt.prompt_index == prompt_index
            )
        ).scalar_one_or_none()
    if not messages:
        return None
    users = [m.get("content", "") for m in messages if isinstance(m, dict)]
    return str(users[-1]) if users else None


def prompt_chains(sessions: Sessions, run_id: int, prompt_index: int) -> list[dict[str, Any]]:
    """The chains of one prompt of a run, in chain order."""
    with sessions() as s:
        rows = s.execute(
            select(
                Chain.id,
                Chain.chain_index,
                Chain.status,
                Chain.current_step,
                Chain.target_steps,
                Chain.accepted_steps,
                Chain.state_reward,
                Chain.last_error,
            )
            .join(Prompt, Prompt.id == Chain.prompt_id)
            .where(Chain.run_id == run_id, Prompt.prompt_index == prompt_index)
            .order_by(Chain.chain_index)
            .limit(CHAIN_LIST_LIMIT)
        ).all()
    return [
        {
            "chain_id": cid,
            "chain_index": ci,
            "status": status,
            "current_step": cur,
            "target_steps": target,
            "acceptance_rate": (acc / cur) if cur > 0 else None,
            "state_reward": reward,
            "last_error": err,
        }
        for cid, ci, status, cur, target, acc, reward, err in rows
    ]


def latency_columns() -> list[str]:
    """The optional per-proposal latency columns this schema has."""
    return [c for c in OPTIONAL_LATENCY if hasattr(Proposal, c)]


def chain_detail(sessions: Sessions, chain_id: int) -> dict[str, Any]:
    """A chain, its run and prompt, and its proposals in step order (the latest
    `CHAIN_PAGE_LIMIT`)."""
    extra = latency_columns()
    with sessions() as s:
        chain = s.get(Chain, chain_id)
        if chain is None:
            raise NotFoundError(f"no chain with id {chain_id}")
        run = s.get(Run, chain.run_id)
        prompt = s.get(Prompt, chain.prompt_id)
        total = int(
            s.execute(
                select(func.count(Proposal.id)).where(Proposal.chain_id == chain_id)
            ).scalar_one()
        )
        cols = [
            Proposal.step,
            Proposal.cut,
            Proposal.text,
            Proposal.accepted,
            Proposal.reward,
            Proposal.log_a,
            Proposal.alpha,
            Proposal.gen_tokens,
            Proposal.response_len,
            Proposal.reward_tokens,
            Proposal.gen_latency_ms,
            Proposal.reward_latency_ms,
            Proposal.finish,
            Proposal.reject_reason,
            Proposal.error,
            Proposal.worker,
            *(getattr(Proposal, c) for c in extra),
        ]
        # The latest proposals, plus the accepted one before them (the state they started from).
        start = max(0, total - CHAIN_PAGE_LIMIT)
        rows = s.execute(
            select(*cols)
            .where(Proposal.chain_id == chain_id, Proposal.step >= start)
            .order_by(Proposal.step)
        ).all()
        before = None
        if start > 0:
            before = s.execute(
                select(Proposal.text)
                .where(
                    Proposal.chain_id == chain_id,
                    Proposal.step < start,
                    Proposal.accepted | (Proposal.step == 0),
                )
                .order_by(Proposal.step.desc())
                .limit(1)
            ).scalar_one_or_none()
    assert run is not None and prompt is not None
    proposals = [dict(r._mapping) for r in rows]
    return {
        "chain": chain,
        "run": run,
        "prompt": prompt,
        "proposals": proposals,
        "proposals_total": total,
        "state_before_first_shown": before,
        "latency_columns": extra,
    }


def cut_char(state_text: str | None, proposal_text: str) -> int:
    """Where the proposal's text leaves the text of the state it was proposed from (characters).

    The cut itself is a token index and the dashboard has no tokenizer; the kept prefix decodes
    to the start the two texts share, so their common prefix marks it in the text.
    """
    if not state_text:
        return 0
    n = min(len(state_text), len(proposal_text))
    i = 0
    while i < n and state_text[i] == proposal_text[i]:
        i += 1
    return i
