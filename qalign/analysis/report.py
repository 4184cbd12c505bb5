"""Accuracy curves per run and method, and the Markdown + PNG report of `qalign report`.

`curves()` is what `qalign predict` prints; `write_report()` adds run summaries, per-task
tables and plots (matplotlib, Agg backend: no display needed). Runs are loaded one at a time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qalign.analysis import predict as P
from qalign.analysis.convergence import (
    QUANTITIES,
    RHAT_THRESHOLD,
    RunDiagnostics,
    run_diagnostics,
)
from qalign.analysis.data import (
    AnalysisError,
    RunInfo,
    RunSummary,
    acceptance_by_step,
    list_runs,
    load_particles,
    load_samples,
    load_trajectories,
    require_answers,
    run_summary,
)
from qalign.storage.repo import Sessions

METHOD_NAMES = {
    "mv": "MV",
    "wmv": "WMV",
    "bon": "BoN",
    "mbr": "MBR (ROUGE-1)",
    "qalign": "QAlign",
    "power": "Power",
    "smc": "SMC (weighted vote)",
    "smc-mv": "SMC (majority vote)",
}
# The order methods are listed in (tables, legends)
METHOD_ORDER = ("mv", "wmv", "bon", "mbr", "qalign", "power", "smc", "smc-mv")


@dataclass(frozen=True)
class Settings:
    """How curves are computed (see `qalign.analysis.predict` for the definitions)."""

    budgets: Sequence[int] | None = None  # None: powers of two up to what each run has
    burn_in: int = 0
    thin: int = 1
    temperature: float = 1.0  # WMV softmax temperature
    subsets: int = P.DEFAULT_SUBSETS  # 0: first n samples
    pool: int | None = None  # QAlign chains per prediction; None: all of a prompt's chains
    select: str = "mv"  # QAlign's selection over states: mv or mbr
    resamples: int = P.DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = 0.95
    loose: bool = False  # IFEval's loose verdicts
    params: dict[str, float] | None = None  # {"generator": N, "reward": M} for FLOPs

    def describe(self) -> str:
        budgets = "powers of two up to each run's pool" if self.budgets is None else self.budgets
        parts = [
            f"budgets {budgets}",
            f"burn-in {self.burn_in}",
            f"thin {self.thin}",
            f"WMV τ {self.temperature:g}",
            f"subsets {self.subsets or 'first n'}",
            f"QAlign pool {self.pool or 'all chains'}",
            f"bootstrap {self.resamples} (seed {self.seed}, {self.confidence:.0%} CI)",
        ]
        if self.loose:
            parts.append("loose verdicts")
        return ", ".join(parts)


@dataclass(frozen=True)
class Curve:
    """One method's accuracy curve on one run."""

    run: RunInfo
    task: str
    method: str
    points: list[P.Point]
    note: str = ""

    @property
    def method_name(self) -> str:
        if self.method in ("qalign", "power"):
            base = "QUEST" if self.run.method == "quest" else METHOD_NAMES[self.method]
            return base + (" (MBR)" if "mbr" in self.note else "")
        return METHOD_NAMES.get(self.method, self.method)

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": self.run.sweep,
            "run": self.run.name,
            "run_id": self.run.id,
            "run_method": self.run.method,
            "beta": self.run.beta,
            "alpha": self.run.config.get("alpha"),
            "temperature": self.run.temperature,
            "steps": self.run.steps,
            "generator_model": self.run.generator_model,
            "task": self.task,
            "method": self.method,
            "note": self.note,
            "points": [_finite(dataclasses.asdict(p)) for p in self.points],
        }


@dataclass
class RunTraces:
    """Per-run data for the plots and the summary table."""

    run: RunInfo
    task: str
    summary: RunSummary
    acceptance: list[tuple[int, float, int]] = field(default_factory=list)
    rewards: list[tuple[int, float, int]] = field(default_factory=list)
    diagnostics: RunDiagnostics | None = None  # chain runs: R-hat and ESS


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _budgets(settings: Settings, max_budget: int) -> list[int]:
    if settings.budgets is None:
        return P.default_budgets(max_budget)
    return [b for b in settings.budgets if b <= max_budget]


def applicable(run: RunInfo, method: str) -> bool:
    """Baselines need independent samples (`ancestral` runs); QAlign needs QAlign or QUEST
    chains, power its own chains, the SMC votes an `smc` run."""
    if method == "qalign":
        return run.method in ("qalign", "quest")
    if method == "power":
        return run.method == "power"
    if method in P.SMC_METHODS:
        return run.is_smc
    return run.method == "ancestral"


# What each method needs, for the error when a sweep has none
NEEDS = {
    "qalign": "QAlign/QUEST runs (a sweep with `method: qalign` or `quest`)",
    "power": "power chains (a sweep with `method: power`)",
    "smc": "SMC particles (a sweep with `method: smc`)",
    "smc-mv": "SMC particles (a sweep with `method: smc`)",
}


def chain_curve(
    run: RunInfo, task: str, chains: dict[int, list[P.Trajectory]], settings: Settings
) -> Curve:
    """The chain vote's curve (QAlign, QUEST or power) on a chain run's loaded trajectories."""
    budgets = _budgets(settings, P.qalign_max_budget(chains, settings.pool))
    points = P.qalign_curve(
        chains,
        budgets,
        burn_in=settings.burn_in,
        thin=settings.thin,
        pool=settings.pool,
        select=settings.select,
        seed=settings.seed,
        resamples=settings.resamples,
        confidence=settings.confidence,
        params=settings.params,
    )
    method = "power" if run.method == "power" else "qalign"
    return Curve(run, task, method, points, "select=mbr" if settings.select == "mbr" else "")


def smc_curves(
    run: RunInfo,
    task: str,
    sets: dict[int, P.ParticleSet],
    methods: Sequence[str],
    settings: Settings,
) -> list[Curve]:
    """The SMC votes' single points on an smc run's loaded particles (budget: its particles)."""
    return [
        Curve(
            run,
            task,
            method,
            P.smc_curve(
                sets,
                run.chains_per_prompt,
                method=method,
                seed=settings.seed,
                resamples=settings.resamples,
                confidence=settings.confidence,
                params=settings.params,
            ),
            f"{run.chains_per_prompt} particles",
        )
        for method in methods
    ]


def sample_curves(
    run: RunInfo,
    task: str,
    samples: dict[int, list[P.Sample]],
    methods: Sequence[str],
    settings: Settings,
) -> list[Curve]:
    """The baselines' curves on an ancestral run's loaded samples."""
    budgets = _budgets(settings, max((len(v) for v in samples.values()), default=0))
    scored = any(not math.isnan(s.reward) for pool in samples.values() for s in pool)
    out = []
    for method in methods:
        if P.USES_REWARD[method] and not scored:
            raise AnalysisError(
                f"run {run.label} has no rewards: {METHOD_NAMES[method]} needs a scored "
                "ancestral run (give its sweep a `reward` section)"
            )
        points = P.independent_curve(
            samples,
            method,
            budgets,
            temperature=settings.temperature,
            subsets=settings.subsets,
            seed=settings.seed,
            resamples=settings.resamples,
            confidence=settings.confidence,
            params=settings.params,
        )
        note = f"τ={settings.temperature:g}" if method == "wmv" else ""
        out.append(Curve(run, task, method, points, note))
    return out


def run_curves(
    sessions: Sessions,
    run: RunInfo,
    task: str,
    methods: Sequence[str],
    settings: Settings,
) -> list[Curve]:
    """The curves of the given methods on one run (its samples or chains loaded once)."""
    methods = [m for m in methods if applicable(run, m)]
    if not methods:
        return []
    if run.has_chains:
        texts = settings.select == "mbr"
        chains = load_trajectories(sessions, run.id, loose=settings.loose, texts=texts)
        return [chain_curve(run, task, chains, settings)]
    if run.is_smc:
        sets = load_particles(sessions, run.id, run.steps, loose=settings.loose)
        return smc_curves(run, task, sets, methods, settings)
    texts = "mbr" in methods
    samples = load_samples(sessions, run.id, loose=settings.loose, texts=texts)
    return sample_curves(run, task, samples, methods, settings)


def sweep_tasks(sessions: Sessions, sweeps: Sequence[tuple[int, str]]) -> dict[int, str]:
    """Each sweep's task label (the task names of its answers); requires a complete eval."""
    return {sid: "+".join(require_answers(sessions, sid, name).tasks) for sid, name in sweeps}


def curves(
    sessions: Sessions,
    sweeps: Sequence[tuple[int, str]],
    method: str,
    settings: Settings,
    *,
    runs: Sequence[str] = (),
) -> list[Curve]:
    """One method's curves on every applicable run of the given (sweep id, name)s.

    `runs` filters by run name or label (sweep/run), substring match.
    """
    if method not in P.METHODS:
        raise AnalysisError(f"unknown method {method!r}; expected one of {', '.join(P.METHODS)}")
    tasks = sweep_tasks(sessions, sweeps)
    chosen = [
        r
        for r in list_runs(sessions, [sid for sid, _ in sweeps])
        if applicable(r, method) and (not runs or any(f in r.label for f in runs))
    ]
    if not chosen:
        kind = NEEDS.get(method, "independent samples (a sweep with `method: ancestral`)")
        names = ", ".join(name for _, name in sweeps)
        raise AnalysisError(f"{METHOD_NAMES[method]} needs {kind}; none in {names}")
    out: list[Curve] = []
    for run in chosen:
        out.extend(run_curves(sessions, run, tasks[run.sweep_id], [method], settings))
    return out


# ---- report --------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "task"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _cell(p: P.Point) -> str:
    if math.isnan(p.ci_low):
        return _fmt(p.accuracy)
    return f"{_fmt(p.accuracy)} [{_fmt(p.ci_low)}, {_fmt(p.ci_high)}]"


def _compute_cell(p: P.Point) -> str:
    if p.flops is not None:
        return _fmt(p.flops, ".3g")
    return f"{_fmt(p.gen_tokens, '.4g')} + {_fmt(p.reward_tokens, '.4g')}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return lines


def _methods_for(run: RunInfo, votable: bool, scored: bool) -> list[str]:
    if run.has_chains:
        return ["power" if run.method == "power" else "qalign"]
    if run.is_smc:
        # Both votes need answers to vote on; free-form tasks get no SMC prediction.
        return list(P.SMC_METHODS) if votable else []
    if votable:
        return ["mv", *(["wmv", "bon"] if scored else [])]
    return ["mbr", *(["bon"] if scored else [])]


def _x(p: P.Point) -> float:
    """The compute axis: FLOPs per prompt, else generated + reward-model tokens per prompt."""
    return p.flops if p.flops is not None else p.gen_tokens + p.reward_tokens


def _seconds(p: P.Point) -> float | None:
    """The wall-clock axis: generator + reward server seconds per prompt (None: unmeasured)."""
    return p.server_seconds


def _timed(c: Curve) -> bool:
    """Whether every point of a curve has server seconds (runs stored before migration 0007,
    or with any unmeasured proposal, have none)."""
    return bool(c.points) and all(p.server_seconds is not None for p in c.points)


def _plot_error_vs_compute(curves_: Sequence[Curve], path: Path, title: str) -> None:
    with_flops = all(p.flops is not None for c in curves_ for p in c.points)
    xlabel = (
        "FLOPs per prompt (2·params·tokens)"
        if with_flops
        else "generated + reward-model tokens per prompt"
    )
    _plot_error_vs(curves_, path, title, _x, xlabel)


def _plottable(c: Curve, x: Callable[[P.Point], float | None]) -> list[tuple[float, P.Point]]:
    """The curve's points a log-scaled cost axis can show: a positive cost, a finite accuracy."""
    return [
        (xv, p)
        for p in c.points
        if (xv := x(p)) is not None and xv > 0 and math.isfinite(p.accuracy)
    ]


def _plot_error_vs(
    curves_: Sequence[Curve],
    path: Path,
    title: str,
    x: Callable[[P.Point], float | None],
    xlabel: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for c in curves_:
        pts = _plottable(c, x)
        if not pts:
            continue
        xs = [xv for xv, _ in pts]
        ys = [1.0 - p.accuracy for _, p in pts]
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=f"{c.method_name} · {c.run.label}")
        if all(math.isfinite(p.ci_low) for _, p in pts):
            ax.fill_between(
                xs,
                [1.0 - p.ci_high for _, p in pts],
                [1.0 - p.ci_low for _, p in pts],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("error rate (1 − accuracy)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_traces(
    traces: Sequence[RunTraces],
    pick: Callable[[RunTraces], list[tuple[int, float, int]]],
    path: Path,
    ylabel: str,
    title: str,
    baselines: Sequence[tuple[str, float]] = (),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for t in traces:
        rows = pick(t)
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], label=t.run.label)
    for label, value in baselines:
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.annotate(label, (0, value), fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # power chains alone have no reward trace
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The comparison figure's cost axes: (key, axis label, value of a point or None)
COST_AXES: tuple[tuple[str, str, Callable[[P.Point], float | None]], ...] = (
    ("tokens", "generated + reward-model tokens per prompt",
     lambda p: p.gen_tokens + p.reward_tokens),
    ("flops", "FLOPs per prompt (2·params·tokens)", lambda p: p.flops),
    ("seconds", "generator + reward server seconds per prompt", lambda p: p.server_seconds),
)  # fmt: skip
MARKERS = {"mv": "o", "wmv": "s", "bon": "^", "mbr": "v", "qalign": "D", "power": "P",
           "smc": "*", "smc-mv": "X"}  # fmt: skip


def cost_axes(curves_: Sequence[Curve]) -> list[str]:
    """The cost axes every curve of a comparison has a value on: tokens always, FLOPs when the
    parameter counts were given, server seconds when every point has them stored."""
    points = [p for c in curves_ for p in c.points]
    out = ["tokens"]
    if points and all(p.flops is not None for p in points):
        out.append("flops")
    if points and all(p.server_seconds is not None for p in points):
        out.append("seconds")
    return out


def _plot_comparison(curves_: Sequence[Curve], path: Path, title: str) -> list[str]:
    """Every method's error rate against each cost axis, one panel per axis; returns the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    axes = cost_axes(curves_)
    curves_ = sorted(curves_, key=lambda c: METHOD_ORDER.index(c.method))
    fig, panels = plt.subplots(1, len(axes), figsize=(5.2 * len(axes), 4.8), squeeze=False)
    for ax, key in zip(panels[0], axes, strict=True):
        _, xlabel, x = next(a for a in COST_AXES if a[0] == key)
        for c in curves_:
            pts = _plottable(c, x)
            if not pts:
                continue
            ax.plot(
                [xv for xv, _ in pts],
                [1.0 - p.accuracy for _, p in pts],
                marker=MARKERS.get(c.method, "o"),
                ms=7 if len(pts) == 1 else 4,  # a single-point method (SMC) stays visible
                label=f"{c.method_name} · {c.run.label}",
            )
        ax.set_xscale("log")
        # Minor labels collide on a short log range (seconds spanning less than a decade).
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("error rate (1 − accuracy)")
        ax.grid(True, which="both", alpha=0.3)
    panels[0][0].legend(fontsize=6, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return axes


def _markdown_comparison(
    task: str, cs: Sequence[Curve], image: str, axes: Sequence[str]
) -> list[str]:
    """Every method's points on one table, with every cost the comparison figure plots."""
    header = ["method", "run", "budget", "accuracy", "gen tokens/prompt", "RM tokens/prompt"]
    header += ["FLOPs/prompt"] if "flops" in axes else []
    header += ["server s/prompt"] if "seconds" in axes else []
    rows = []
    for c in sorted(cs, key=lambda c: METHOD_ORDER.index(c.method)):
        for p in c.points:
            rows.append(
                [c.method_name, c.run.label + (f" ({c.note})" if c.note else ""), str(p.budget),
                 _cell(p), _fmt(p.gen_tokens, ".1f"), _fmt(p.reward_tokens, ".1f")]
                + ([_fmt(p.flops, ".3g")] if "flops" in axes else [])
                + ([_fmt(p.server_seconds, ".3g")] if "seconds" in axes else [])
            )  # fmt: skip
    shown = ", ".join(label for key, label, _ in COST_AXES if key in axes)
    return [
        f"### Comparison: every method ({task})",
        "",
        "Every method of the sweeps on one figure and one table: accuracy against cost per "
        f"prompt ({shown}). A budget is generations per prompt for the baselines and chains, "
        "the particles per prompt for SMC (one point per run, its whole cost: every block of "
        "every particle).",
        "",
        *_table(header, rows),
        "",
        f"![comparison, {task}]({image})",
        "",
    ]


def _beta_groups(curves_: Sequence[Curve]) -> dict[tuple[Any, ...], list[Curve]]:
    groups: dict[tuple[Any, ...], list[Curve]] = {}
    for c in curves_:
        if c.method == "qalign" and c.run.beta is not None and c.points:
            key = (c.run.sweep, c.run.method, c.run.temperature, c.run.steps, c.run.generator_model)
            groups.setdefault(key, []).append(c)
    return {k: v for k, v in groups.items() if len({c.run.beta for c in v}) >= 2}


def _plot_accuracy_vs_beta(
    groups: dict[tuple[Any, ...], list[Curve]], path: Path, title: str
) -> list[str]:
    """Accuracy at the largest budget every run of a group reached, against β."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    notes = []
    for (sweep, method, temp, steps, model), cs in groups.items():
        budget = min(max(p.budget for p in c.points) for c in cs)
        rows = []
        for c in sorted(cs, key=lambda c: c.run.beta or 0.0):
            p = next((p for p in c.points if p.budget == budget), None)
            if p is not None and c.run.beta is not None:
                rows.append((c.run.beta, p))
        if not rows:
            continue
        xs = [b for b, _ in rows]
        ys = [p.accuracy for _, p in rows]
        lo = [max(0.0, p.accuracy - p.ci_low) if math.isfinite(p.ci_low) else 0.0 for _, p in rows]
        hi = [
            max(0.0, p.ci_high - p.accuracy) if math.isfinite(p.ci_high) else 0.0 for _, p in rows
        ]
        label = f"{sweep}: {method}, T={temp:g}, steps={steps}, {model}, budget {budget}"
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        notes.append(label)
    ax.set_xscale("log")
    ax.set_xlabel("β (reward temperature)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return notes


def write_report(
    sessions: Sessions,
    sweeps: Sequence[tuple[int, str]],
    out_dir: Path,
    settings: Settings,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write OUT/report.md (and report.json) with the PNG plots it references; returns its path.

    Methods per run: QAlign (or QUEST) on chain runs; on ancestral runs MV, WMV and BoN when the
    task's answers can be voted on, else MBR (and BoN); WMV and BoN only when the run is scored.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = sweep_tasks(sessions, sweeps)
    runs = list_runs(sessions, [sid for sid, _ in sweeps])
    all_curves: list[Curve] = []
    traces: list[RunTraces] = []
    for run in runs:
        if progress is not None:
            progress(f"analysing {run.label}")
        summary = run_summary(sessions, run.id)
        votable, scored = summary.with_answer > 0, summary.scored > 0
        run_settings = settings
        if run.has_chains and not votable and settings.select == "mv":
            run_settings = dataclasses.replace(settings, select="mbr")
        task = tasks[run.sweep_id]
        t = RunTraces(run, task, summary)
        if run.has_chains:
            chains = load_trajectories(
                sessions, run.id, loose=settings.loose, texts=run_settings.select == "mbr"
            )
            all_curves.append(chain_curve(run, task, chains, run_settings))
            t.acceptance = acceptance_by_step(sessions, run.id)
            t.rewards = P.mean_state_reward([c for cs in chains.values() for c in cs])
            del chains
            t.diagnostics = run_diagnostics(sessions, run.id, burn_in=settings.burn_in)
        else:
            methods = _methods_for(run, votable, scored)
            all_curves.extend(run_curves(sessions, run, task, methods, run_settings))
        traces.append(t)

    md = _markdown_head(sweeps, settings, traces)
    by_task: dict[str, list[Curve]] = {}
    for c in all_curves:
        by_task.setdefault(c.task, []).append(c)
    images: list[str] = []
    for task, cs in by_task.items():
        name = f"compare-{_slug(task)}.png"
        axes = _plot_comparison(cs, out_dir / name, f"{task}: every method, error vs cost")
        images.append(name)
        section = _markdown_task(task, cs)
        # The comparison leads the task's section, before the per-method tables.
        md += section[:2] + _markdown_comparison(task, cs, name, axes) + section[2:]
        name = f"error_vs_compute-{_slug(task)}.png"
        _plot_error_vs_compute(cs, out_dir / name, f"{task}: error vs compute")
        images.append(name)
        md += [
            "",
            "Error rate against compute per prompt (log scale; shaded: bootstrap interval).",
            "",
            f"![error vs compute, {task}]({name})",
            "",
        ]
        timed = [c for c in cs if _timed(c)]
        if timed:
            name = f"error_vs_seconds-{_slug(task)}.png"
            _plot_error_vs(
                timed,
                out_dir / name,
                f"{task}: error vs server time",
                _seconds,
                "generator + reward server seconds per prompt",
            )
            images.append(name)
            untimed = sorted({c.run.label for c in cs if not _timed(c)})
            md += [
                "Error rate against wall-clock cost: the seconds the generator and reward "
                "servers spent on the samples and steps used, per prompt (log scale; a reward "
                "answered from the in-process cache costs 0)."
                + (f" Not shown (no latency stored): {', '.join(untimed)}." if untimed else ""),
                "",
                f"![error vs server seconds, {task}]({name})",
                "",
            ]
        groups = _beta_groups(cs)
        if groups:
            name = f"accuracy_vs_beta-{_slug(task)}.png"
            notes = _plot_accuracy_vs_beta(groups, out_dir / name, f"{task}: accuracy vs β")
            images.append(name)
            md += [
                f"### Accuracy vs β ({task})",
                "",
                "QAlign's accuracy at the largest budget all runs of a group reached: "
                + "; ".join(notes)
                + ".",
                "",
                f"![accuracy vs beta, {task}]({name})",
                "",
            ]
    chain_traces = [t for t in traces if t.run.has_chains]
    if chain_traces:
        md += ["## Chains", ""]
        _plot_traces(
            chain_traces,
            lambda t: t.acceptance,
            out_dir / "acceptance.png",
            "acceptance rate",
            "acceptance rate of the proposals at each step",
        )
        baselines = [
            (f"{t.run.label} (independent samples)", float(t.summary.mean_proposal_reward))
            for t in traces
            if t.run.method == "ancestral" and t.summary.mean_proposal_reward is not None
        ]
        _plot_traces(
            chain_traces,
            lambda t: t.rewards,
            out_dir / "rewards.png",
            "mean reward of current states",
            "state reward trace (dashed: mean reward of independent samples)",
            baselines,
        )
        images += ["acceptance.png", "rewards.png"]
        md += [
            "Acceptance rate of the MCMC proposals at each step, per run:",
            "",
            "![acceptance rate vs step](acceptance.png)",
            "",
            "Mean reward of current states after each step (a chain's state is its last "
            "accepted proposal; not the mean reward of proposals), per run; dashed lines: mean "
            "reward of the independent samples:",
            "",
            "![reward traces](rewards.png)",
            "",
            *_markdown_diagnostics(chain_traces, settings.burn_in),
        ]
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    (out_dir / "report.json").write_text(
        json.dumps(
            {
                "sweeps": [name for _, name in sweeps],
                "settings": _finite(dataclasses.asdict(settings)),
                "curves": [c.to_json() for c in all_curves],
                "diagnostics": {
                    t.run.label: t.diagnostics.to_json(per_prompt=True)
                    for t in traces
                    if t.diagnostics is not None
                },
                "images": images,
            },
            indent=2,
        )
    )
    return path


def _markdown_head(
    sweeps: Sequence[tuple[int, str]], settings: Settings, traces: Sequence[RunTraces]
) -> list[str]:
    names = ", ".join(name for _, name in sweeps)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    params = settings.params or {}
    flops_note = (
        f"FLOPs ≈ 2·params·tokens with {params.get('generator', '?'):g} generator and "
        f"{params.get('reward', 0):g} reward-model parameters"
        if params.get("generator") is not None
        else "no parameter counts were given (`--generator-params`, `--reward-params`), so "
        "compute is shown as generated + reward-model tokens per prompt"
    )
    md = [
        f"# QAlign report: {names}",
        "",
        f"Generated by `qalign report` on {now}. Settings: {settings.describe()}.",
        "",
        "A **budget** n is the number of generations spent per prompt: n independent samples "
        "for MV, WMV, BoN and MBR (the mean over random n-subsets of each prompt's samples, or "
        "every subset when there are few); n chain steps for QAlign (step 0, the initial "
        "sample, included), shared round-robin by the chains pooled into one prediction. "
        "Intervals are percentile bootstrap intervals over prompts. Compute counts the stored "
        f"generated and reward-model tokens of the samples and steps used; {flops_note}. "
        "MV and MBR never call the reward model.",
        "",
        "## Runs",
        "",
    ]
    rows = []
    for t in traces:
        s = t.summary
        rows.append(
            [
                t.run.label,
                t.run.method,
                t.task,
                _fmt(t.run.beta, "g"),
                _fmt(t.run.temperature, "g"),
                str(t.run.steps),
                str(t.run.chains_per_prompt),
                str(s.prompts),
                str(s.proposals),
                _fmt(None if t.run.is_smc else s.acceptance),
                str(s.prompts_converged) if s.chains_converged else "–",
                _fmt(s.mean_proposal_reward),
                _fmt(s.gen_tokens / s.prompts if s.prompts else None, ".1f"),
                _fmt(s.reward_tokens / s.prompts if s.prompts else None, ".1f"),
                _fmt(s.correct / s.answered if s.answered else None),
            ]
        )
    header = [
        "run",
        "method",
        "task",
        "β",
        "temperature",
        "steps",
        "chains/prompt",
        "prompts",
        "proposals",
        "acceptance",
        "prompts converged (stop_when)",
        "mean reward of proposals",
        "gen tokens/prompt",
        "RM tokens/prompt",
        "correct proposals",
    ]
    md += [*_table(header, rows), ""]
    return md


def _rhat_cell(x: float) -> str:
    return "∞" if x == math.inf else _fmt(x)


def _markdown_diagnostics(traces: Sequence[RunTraces], burn_in: int) -> list[str]:
    """The convergence diagnostics of each chain run, pooled over its prompts."""
    dropped = f", less the first {burn_in} of each chain (the burn-in)" if burn_in else ""
    md = [
        "### Convergence diagnostics",
        "",
        "Rank-normalised split-R-hat and bulk and tail effective sample sizes (Vehtari et al. "
        "2021, as ArviZ computes them) of the chain states' reward and response length "
        "(tokens), for each prompt over its chains, with the state after every step (step 0 "
        f"included) as a draw{dropped}. Per run: the largest and the median prompt R-hat "
        "(∞: a prompt's chains are each stuck at a different value), the prompts whose R-hat "
        f"exceeds {RHAT_THRESHOLD}, and the smallest and the median prompt ESS. A prompt whose "
        "R-hat is undefined (every state equal, or fewer than 4 states) is left out of the "
        "R-hat figures. `report.json` has every prompt's values.",
        "",
    ]
    rows = []
    for t in traces:
        d = t.diagnostics
        if d is None:
            continue
        for q in QUANTITIES:
            p = d.pooled(q)
            rows.append(
                [
                    t.run.label,
                    q,
                    str(p.prompts),
                    _rhat_cell(p.rhat_max),
                    _rhat_cell(p.rhat_median),
                    str(p.rhat_over),
                    f"{_fmt(p.ess_bulk_min, '.0f')} ({_fmt(p.ess_bulk_median, '.0f')})",
                    f"{_fmt(p.ess_tail_min, '.0f')} ({_fmt(p.ess_tail_median, '.0f')})",
                ]
            )
    header = [
        "run",
        "quantity",
        "prompts",
        "R-hat max",
        "R-hat median",
        f"prompts with R-hat > {RHAT_THRESHOLD}",
        "bulk ESS min (median)",
        "tail ESS min (median)",
    ]
    return [*md, *_table(header, rows), ""]


def _markdown_task(task: str, cs: Sequence[Curve]) -> list[str]:
    md = [f"## Task: {task}", ""]
    for method in sorted({c.method for c in cs}, key=METHOD_ORDER.index):
        mcs = [c for c in cs if c.method == method]
        budgets = sorted({p.budget for c in mcs for p in c.points})
        name = mcs[0].method_name if len({c.method_name for c in mcs}) == 1 else method
        md += [f"### {name}: accuracy by budget", ""]
        rows = []
        for c in mcs:
            by = {p.budget: p for p in c.points}
            rows.append(
                [c.run.label + (f" ({c.note})" if c.note else "")]
                + [_cell(by[b]) if b in by else "–" for b in budgets]
            )
        md += [*_table(["run", *[str(b) for b in budgets]], rows), ""]
        with_flops = all(p.flops is not None for c in mcs for p in c.points)
        unit = "FLOPs per prompt" if with_flops else "generated + RM tokens per prompt"
        md += [f"{name}: {unit} by budget", ""]
        rows = []
        for c in mcs:
            by = {p.budget: p for p in c.points}
            rows.append([c.run.label] + [_compute_cell(by[b]) if b in by else "–" for b in budgets])
        md += [*_table(["run", *[str(b) for b in budgets]], rows), ""]
        if any(_timed(c) for c in mcs):
            md += [f"{name}: generator + reward server seconds per prompt by budget", ""]
            rows = []
            for c in mcs:
                by = {p.budget: p for p in c.points}
                rows.append(
                    [c.run.label]
                    + [_fmt(_seconds(by[b]), ".3g") if b in by else "–" for b in budgets]
                )
            md += [*_table(["run", *[str(b) for b in budgets]], rows), ""]
    return md


__all__ = [
    "METHOD_NAMES",
    "Curve",
    "RunTraces",
    "Settings",
    "applicable",
    "chain_curve",
    "cost_axes",
    "curves",
    "run_curves",
    "sample_curves",
    "smc_curves",
    "sweep_tasks",
    "write_report",
]
