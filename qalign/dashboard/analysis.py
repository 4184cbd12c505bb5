"""Per-run analyses that need every proposal of a run (traces over steps, R-hat and ESS,
acceptance by cut, accuracy of the current answers, error-vs-compute curves).

They stream one ordered query per run, so they run on a background thread and are cached
until the run's fingerprint (its committed steps) changes: a page never waits for them; it shows
the latest result with the step count it was computed at, and polls until a fresh one is ready.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select

from qalign.analysis.data import (
    CHAIN_RUN_METHODS,
    AnalysisError,
    load_samples,
    load_trajectories,
)
from qalign.analysis.predict import independent_curve, qalign_curve
from qalign.core.diagnostics import Diagnostics, diagnose, summarise
from qalign.dashboard.queries import Fingerprint
from qalign.storage.models import Answer, Chain, Prompt, Proposal
from qalign.storage.repo import Sessions

log = logging.getLogger(__name__)

STREAM_BATCH = 5000
CHECKPOINTS = 12  # steps at which R-hat and ESS are computed for the plots over steps
CUT_BINS = 20
CURVE_RESAMPLES = 200  # bootstrap resamples of the curves' intervals (predict's default: 1000)
MAX_POINTS = 200  # points per series sent to the browser


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class _Chain:
    """One chain's states and proposals, in step order (a gap ends the walk)."""

    state_reward: list[float] = field(default_factory=list)
    state_len: list[float] = field(default_factory=list)
    prop_reward: list[float] = field(default_factory=list)
    prop_len: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)
    correct: bool | None = None  # of the current state's checked answer (None: not checked)
    broken: bool = False

    def add(
        self, step: int, accepted: bool, reward: float | None, length: int, correct: Any
    ) -> None:
        if self.broken or step != len(self.state_reward):
            self.broken = True
            return
        r = math.nan if reward is None else float(reward)
        self.prop_reward.append(r)
        self.prop_len.append(float(length))
        self.accepted.append(bool(accepted))
        if accepted or step == 0:
            self.state_reward.append(r)
            self.state_len.append(float(length))
            self.correct = None if correct is None else bool(correct)
        else:
            self.state_reward.append(self.state_reward[-1])
            self.state_len.append(self.state_len[-1])


class _Sums:
    """Per-step sums and counts of one series (NaN values left out)."""

    def __init__(self) -> None:
        self.sum: dict[int, float] = {}
        self.n: dict[int, int] = {}

    def add(self, values: list[float], start: int = 0) -> None:
        for k in range(start, len(values)):
            v = values[k]
            if not math.isnan(v):
                self.sum[k] = self.sum.get(k, 0.0) + v
                self.n[k] = self.n.get(k, 0) + 1

    def series(self) -> list[tuple[int, float]]:
        return [(k, self.sum[k] / self.n[k]) for k in sorted(self.n)]


def _thin(points: list[tuple[int, float | None]]) -> list[list[Any]]:
    step = max(1, math.ceil(len(points) / MAX_POINTS))
    kept = points[::step]
    if points and kept[-1] != points[-1]:
        kept.append(points[-1])
    return [[x, _num(y)] for x, y in kept]


def _checkpoints(length: int) -> list[int]:
    """State counts at which to diagnose: up to CHECKPOINTS of 4..length (R-hat needs 4)."""
    if length < 4:
        return []
    return sorted({round(x) for x in np.linspace(4, length, min(CHECKPOINTS, length - 3))})


def _diag_prompt(
    rewards: list[list[float]], lengths: list[list[float]], marks: list[int]
) -> dict[str, Any]:
    n = min(len(t) for t in rewards)
    r = np.array([t[:n] for t in rewards], dtype=np.float64)
    ln = np.array([t[:n] for t in lengths], dtype=np.float64)
    full_r, full_l = diagnose(r), diagnose(ln)
    over = {}
    for m in marks:
        if m <= n:
            over[m] = (diagnose(r[:, :m]), diagnose(ln[:, :m]))
    return {"draws": n, "reward": full_r, "length": full_l, "over": over}


def analyse_run(sessions: Sessions, run_id: int, method: str) -> dict[str, Any]:
    """Every per-run figure that needs the run's proposals (see the module docstring)."""
    t0 = time.perf_counter()
    q = (
        select(
            Prompt.prompt_index,
            Proposal.chain_id,
            Proposal.step,
            Proposal.accepted,
            Proposal.reward,
            Proposal.response_len,
            Proposal.cut,
            Answer.correct,
        )
        .select_from(Proposal)
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .outerjoin(Answer, Answer.proposal_id == Proposal.id)
        .where(Proposal.run_id == run_id)
        .order_by(Prompt.prompt_index, Chain.chain_index, Proposal.step)
    )
    prompts: dict[int, list[_Chain]] = {}
    cut_acc: dict[int, list[int]] = {}  # cut -> [accepted, proposals] (MCMC steps only)
    current: _Chain | None = None
    current_id = None
    with sessions() as s:
        for part in s.execute(q.execution_options(yield_per=STREAM_BATCH)).partitions():
            for p_idx, chain_id, step, accepted, reward, length, cut, correct in part:
                if chain_id != current_id:
                    current, current_id = _Chain(), chain_id
                    prompts.setdefault(p_idx, []).append(current)
                assert current is not None
                current.add(step, accepted, reward, length, correct)
                if step > 0:
                    tally = cut_acc.setdefault(int(cut), [0, 0])
                    tally[0] += bool(accepted)
                    tally[1] += 1
    state_r, prop_r, state_l, prop_l, acc = _Sums(), _Sums(), _Sums(), _Sums(), _Sums()
    for chains in prompts.values():
        for c in chains:
            state_r.add(c.state_reward)
            prop_r.add(c.prop_reward)
            state_l.add(c.state_len)
            prop_l.add(c.prop_len)
            acc.add([float(a) for a in c.accepted], start=1)
    per_step = {
        "state_reward": _thin(list(state_r.series())),
        "proposal_reward": _thin(list(prop_r.series())),
        "state_length": _thin(list(state_l.series())),
        "proposal_length": _thin(list(prop_l.series())),
        "acceptance": _thin(list(acc.series())),
    }
    has_chains = method in CHAIN_RUN_METHODS
    common = min((min(len(c.state_reward) for c in cs) for cs in prompts.values() if cs), default=0)
    marks = _checkpoints(common) if has_chains else []
    prompt_rows: dict[int, dict[str, Any]] = {}
    over: dict[int, dict[str, list[float]]] = {
        m: {"rr": [], "rl": [], "er": [], "el": []} for m in marks
    }
    full_r: list[Diagnostics] = []
    full_l: list[Diagnostics] = []
    for idx, chains in prompts.items():
        walked = [c for c in chains if c.state_reward]
        checked = [c.correct for c in walked if c.correct is not None]
        row: dict[str, Any] = {
            "accuracy": (sum(checked) / len(checked)) if checked else None,
            "answered": len(checked),
        }
        if has_chains and walked:
            d = _diag_prompt([c.state_reward for c in walked], [c.state_len for c in walked], marks)
            full_r.append(d["reward"])
            full_l.append(d["length"])
            row.update(
                rhat_reward=_num(d["reward"].rhat),
                rhat_length=_num(d["length"].rhat),
                ess_bulk_reward=_num(d["reward"].ess_bulk),
                ess_tail_reward=_num(d["reward"].ess_tail),
                draws=d["draws"],
            )
            for m, (dr, dl) in d["over"].items():
                over[m]["rr"].append(dr.rhat)
                over[m]["rl"].append(dl.rhat)
                over[m]["er"].append(min(dr.ess_bulk, dr.ess_tail))
                over[m]["el"].append(min(dl.ess_bulk, dl.ess_tail))
        prompt_rows[idx] = row

    def pooled(key: str, pick: int) -> list[tuple[int, float | None]]:
        # summarise -> (min, median, max) over prompts; the step is the last state's index.
        return [(m - 1, summarise(over[m][key])[pick]) for m in marks]

    diag_steps = {
        "rhat_reward_max": _thin(pooled("rr", 2)),
        "rhat_length_max": _thin(pooled("rl", 2)),
        "ess_reward_min": _thin(pooled("er", 0)),
        "ess_length_min": _thin(pooled("el", 0)),
    }
    all_checked = [c.correct for cs in prompts.values() for c in cs if c.correct is not None]
    return {
        "per_step": per_step,
        "diagnostics_over_steps": diag_steps,
        "rhat_reward_max": _num(summarise([d.rhat for d in full_r])[2]) if full_r else None,
        "rhat_length_max": _num(summarise([d.rhat for d in full_l])[2]) if full_l else None,
        "ess_reward_min": _num(summarise([min(d.ess_bulk, d.ess_tail) for d in full_r])[0])
        if full_r
        else None,
        "prompts": prompt_rows,
        "accuracy": (sum(all_checked) / len(all_checked)) if all_checked else None,
        "answered_chains": len(all_checked),
        "cut_acceptance": _cut_bins(cut_acc),
        "seconds": time.perf_counter() - t0,
    }


def _cut_bins(cut_acc: dict[int, list[int]]) -> list[dict[str, Any]]:
    """Acceptance by cut position, in at most CUT_BINS equal-width bins of token positions."""
    if not cut_acc:
        return []
    hi = max(cut_acc) + 1
    width = max(1, math.ceil(hi / CUT_BINS))
    bins: dict[int, list[int]] = {}
    for cut, (a, n) in cut_acc.items():
        b = bins.setdefault(cut // width, [0, 0])
        b[0] += a
        b[1] += n
    return [
        {"from": b * width, "to": b * width + width - 1, "proposals": n, "acceptance": a / n}
        for b, (a, n) in sorted(bins.items())
    ]


def run_curves(sessions: Sessions, run_id: int, method: str) -> dict[str, Any]:
    """Error (1 - accuracy) against generated tokens and server-seconds per prompt, per
    `qalign predict` method: points are [tokens, error, budget, seconds or None]."""
    t0 = time.perf_counter()
    try:
        samples = load_samples(sessions, run_id)
        curves: dict[str, Any] = {}
        for m in ("mv", "wmv", "bon"):
            pts = independent_curve(samples, m, resamples=CURVE_RESAMPLES)
            curves[m] = [[p.gen_tokens, 1 - p.accuracy, p.budget, p.server_seconds] for p in pts]
        if method in CHAIN_RUN_METHODS:
            traj = load_trajectories(sessions, run_id)
            pts = qalign_curve(traj, resamples=CURVE_RESAMPLES)
            curves["qalign"] = [
                [p.gen_tokens, 1 - p.accuracy, p.budget, p.server_seconds] for p in pts
            ]
    except AnalysisError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - t0}
    return {"curves": curves, "seconds": time.perf_counter() - t0}


@dataclass
class _Entry:
    fingerprint: Fingerprint | None = None
    result: dict[str, Any] | None = None
    computed_at: float = 0.0
    pending: Future[None] | None = None
    error: str | None = None


class AnalysisCache:
    """Background analyses per (kind, run), recomputed when the run's fingerprint changes."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qalign-dash-analysis")
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], _Entry] = {}

    def get(self, kind: str, run_id: int, method: str, fingerprint: Fingerprint) -> dict[str, Any]:
        """The latest result (possibly of an earlier fingerprint) and whether it is current;
        schedules a computation when it is not and none is under way."""
        fn: Callable[[Sessions, int, str], dict[str, Any]] = (
            analyse_run if kind == "run" else run_curves
        )
        key = (kind, run_id)
        with self._lock:
            e = self._entries.setdefault(key, _Entry())
            fresh = e.fingerprint == fingerprint and e.result is not None
            if not fresh and e.pending is None:
                e.pending = self._pool.submit(self._compute, key, fn, method, fingerprint)
            return {
                "result": e.result,
                "current": fresh,
                "as_of_steps": None if e.fingerprint is None else e.fingerprint.steps,
                "error": e.error,
            }

    def wait(self, kind: str, run_id: int, timeout: float = 60.0) -> None:
        """Block until the pending computation of (kind, run) ends (for tests and benchmarks)."""
        with self._lock:
            e = self._entries.get((kind, run_id))
            pending = None if e is None else e.pending
        if pending is not None:
            pending.result(timeout)

    def _compute(
        self,
        key: tuple[str, int],
        fn: Callable[[Sessions, int, str], dict[str, Any]],
        method: str,
        fingerprint: Fingerprint,
    ) -> None:
        result: dict[str, Any] | None = None
        error = None
        try:
            result = fn(self.sessions, key[1], method)
        except Exception as exc:  # a page must keep working when one analysis breaks
            log.exception("dashboard analysis %s of run %d failed", *key)
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            e = self._entries[key]
            e.pending = None
            e.fingerprint = fingerprint
            e.error = error
            e.result = result
            e.computed_at = time.time()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
