"""The SMC resampling barrier between two blocks of a prompt's particles (see `core.smc`).

Same shape as `stop_when`'s checkpoint: before block t + 1, a particle whose siblings have not
all committed block t returns `WAITING` and stops (no slot, no broker message). The last one
to arrive resamples for all of them and wakes the waiting ones. Exactly once, whoever runs it
and however often: the decision is a pure function of the stored block-t rows and the
uniform of (seed, prompt key, t), and it is stored by a compare-and-set insert of the
`smc_resamples` row (primary key (run, prompt, block)) together with every particle's
`smc_ancestry` row; a loser, or anyone later, reads what the winner stored. No sibling can
move past block t before that row exists, so the winner read every state after block t.

Particles that failed for good (or were cancelled) before block t take no part: the live ones
are resampled among themselves. A crashed barrier leaves either nothing (it runs again, to the
same decision) or everything.
"""

from __future__ import annotations

from qalign.core import Finish, State
from qalign.core.smc import prompt_key, resample, resample_uniform
from qalign.sampling.smc import Start
from qalign.steps.outcome import Outcome, Result
from qalign.storage import repo
from qalign.storage import smc as store

Wake = tuple[tuple[int, int], ...]


def _start(found: store.Ancestor) -> Start:
    state = State(found.state_tokens, found.state_reward, Finish(found.state_finish))
    return Start(state, found.state_text, found.log_weight)


def barrier(
    sessions: repo.Sessions, chain: repo.ChainRow, at: int, threshold: float
) -> tuple[Outcome | None, Start | None, Wake]:
    """Before block `at` + 1 of `chain`: (an outcome when it must wait, its start, who to wake)."""
    found = store.ancestor(sessions, chain.chain_id, at + 1)
    if found is not None:
        return None, _start(found), ()
    sibs = store.particles(sessions, chain.run_id, chain.prompt_id, at)
    if any(s.current_step < at and s.live for s in sibs):
        out = Outcome(chain.chain_id, at + 1, Result.WAITING, chain_status=chain.status,
                      run_id=chain.run_id)  # fmt: skip
        return out, None, ()
    # Chains already past `at` mean the barrier row exists (we lost a race): the insert below
    # then fails and we read the winner's rows.
    live = [s for s in sibs if s.current_step >= at and s.live]
    u = resample_uniform(chain.seed, prompt_key(chain.rng_key), at)
    plan = resample([s.log_weight for s in live], threshold, u)
    children = [
        (child.chain_id, live[parent], weight)
        for child, parent, weight in zip(live, plan.parents, plan.log_weights, strict=True)
    ]
    decision = store.Barrier(
        chain.run_id, chain.prompt_id, at, plan.ess, plan.resampled, u, children
    )
    store.record_barrier(sessions, decision)
    found = store.ancestor(sessions, chain.chain_id, at + 1)
    if found is None:
        return _dropped_out(sessions, chain, at), None, ()
    wake = tuple(
        (s.chain_id, at + 1) for s in live if s.chain_id != chain.chain_id and s.current_step == at
    )
    return None, _start(found), wake


def _dropped_out(sessions: repo.Sessions, chain: repo.ChainRow, at: int) -> Outcome:
    """Fail a particle for good that the barrier after block `at` ran without.

    It had failed for good before the barrier and was revived (`--retry-failed`): its siblings
    were resampled among themselves and went on, so it has no lineage to continue. Recorded as
    the chain's failure, not raised: one chain's history must not stop a runner.
    """
    message = (
        f"SMCLineageError: particle {chain.chain_id} had failed for good when its prompt's "
        f"resampling after block {at} ran, so its siblings went on without it and it has no "
        "ancestry to continue from; --retry-failed cannot revive it (run the prompt again in a "
        "new sweep)"
    )
    status, attempts = repo.record_failure(sessions, chain.chain_id, at + 1, message, 1)
    # Revived, it counted as live: siblings at a later barrier may be waiting for it. (In the
    # outcome itself: a gate's outcome is returned as it is.)
    return Outcome(chain.chain_id, at + 1, Result.FAILED, chain_status=status, attempts=attempts,
                   error=message, run_id=chain.run_id,
                   wake=released_by_failure(sessions, chain))  # fmt: skip


def released_by_failure(sessions: repo.Sessions, chain: repo.ChainRow) -> Wake:
    """Siblings that may wait at a barrier for a particle that just failed for good."""
    sibs = repo.prompt_chains(sessions, chain.run_id, chain.prompt_id)
    return tuple(
        (s.chain_id, s.current_step + 1)
        for s in sibs
        if s.chain_id != chain.chain_id and s.status not in repo.FINAL
    )
