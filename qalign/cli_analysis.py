"""`qalign eval`, `qalign predict`, `qalign report`: checking answers and analysing sweeps.

Comparing QAlign with its baselines takes several sweeps (a sweep has one method: an
`ancestral` one for MV / WMV / BoN / MBR, a `qalign` one for QAlign, `power`, `smc`, ...), so
every command takes one or more sweeps, and `report` puts all their methods on one figure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from qalign.cli_sweep import DB_HELP, _sessions

METHOD_CHOICES = ["mv", "wmv", "bon", "qalign", "mbr", "power", "smc", "smc-mv"]


@contextmanager
def _clean_errors() -> Iterator[None]:
    """Errors a user can act on become one message without a traceback."""
    from qalign.analysis.data import AnalysisError
    from qalign.config import ConfigError
    from qalign.storage import repo
    from qalign.storage.errors import StorageError

    try:
        yield
    except (AnalysisError, ConfigError, StorageError, repo.SweepNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def _resolve(sessions: Any, refs: Sequence[str]) -> list[tuple[int, str]]:
    from qalign.storage import repo

    out: list[tuple[int, str]] = []
    for ref in refs:
        sweep = repo.find_sweep(sessions, ref)
        if all(sweep.id != sid for sid, _ in out):
            out.append((int(sweep.id), str(sweep.name)))
    return out


def _budgets(text: str | None) -> list[int] | None:
    from qalign.analysis.predict import parse_budgets

    if text is None:
        return None
    try:
        return parse_budgets(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--budgets") from None


def _params(generator: float | None, reward: float | None) -> dict[str, float] | None:
    if generator is None and reward is None:
        return None
    out = {}
    if generator is not None:
        out["generator"] = generator
    if reward is not None:
        out["reward"] = reward
    return out


def _analysis_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options `predict` and `report` share."""
    options = [
        click.option(
            "--budgets",
            help="Comma-separated budgets (generations per prompt), e.g. 1,2,4,8 "
            "(default: powers of two up to what each run has).",
        ),
        click.option(
            "--burn-in", type=click.IntRange(0), default=0, show_default=True,
            help="QAlign: drop each chain's first B steps before voting.",
        ),
        click.option(
            "--thin", type=click.IntRange(1), default=1, show_default=True,
            help="QAlign: vote with every T-th state after the burn-in.",
        ),
        click.option(
            "--pool", type=click.IntRange(1),
            help="QAlign: chains per prediction (default: all of a prompt's chains).",
        ),
        click.option(
            "--temperature", type=click.FloatRange(0, min_open=True), default=1.0,
            show_default=True, help="WMV: softmax temperature τ of the reward weights.",
        ),
        click.option(
            "--subsets", type=click.IntRange(0), default=32, show_default=True,
            help="Baselines: random n-subsets averaged per budget (every subset when there are "
            "fewer); 0 uses the first n samples.",
        ),
        click.option(
            "--bootstrap", "resamples", type=click.IntRange(0), default=1000, show_default=True,
            help="Bootstrap resamples of the prompts for the intervals (0: none).",
        ),
        click.option(
            "--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=0.95, show_default=True, help="Coverage of the intervals.",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Subsets, bootstrap."),
        click.option("--loose", is_flag=True, help="Use IFEval's loose verdicts where stored."),
        click.option(
            "--generator-params", type=float,
            help="Generator parameter count (e.g. 8e9) for FLOPs ≈ 2·params·tokens.",
        ),
        click.option(
            "--reward-params", type=float, help="Reward-model parameter count (e.g. 8e9)."
        ),
        click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _settings(kw: dict[str, Any], select: str = "mv") -> Any:
    from qalign.analysis.report import Settings

    return Settings(
        budgets=_budgets(kw["budgets"]),
        burn_in=kw["burn_in"],
        thin=kw["thin"],
        temperature=kw["temperature"],
        subsets=kw["subsets"],
        pool=kw["pool"],
        select=select,
        resamples=kw["resamples"],
        seed=kw["seed"],
        confidence=kw["confidence"],
        loose=kw["loose"],
        params=_params(kw["generator_params"], kw["reward_params"]),
    )


# ---- qalign eval ---------------------------------------------------------------------------


@click.command("eval")
@click.argument("sweeps", metavar="SWEEP...", nargs=-1, required=True)
@click.option(
    "--task",
    help="Check with this task instead of the one stored with each prompt: a registered name "
    "(gsm8k, math500, mmlu-redux, truthfulqa-mc1, ifeval, custom, ...) or module:attribute "
    "naming a task object or class of your own.",
)
@click.option(
    "--workers", type=click.IntRange(1), default=8, show_default=True, help="Checking threads."
)
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(
    sweeps: tuple[str, ...], task: str | None, workers: int, database: str | None, quiet: bool
) -> None:
    """Check every proposal of SWEEP(s) with its task and store the verdicts (`answers`).

    Identical responses to a prompt are checked once; running eval again replaces the rows, so
    it is safe after a sweep advanced or a checker changed. `qalign predict` and `qalign report`
    need it.

    Example: qalign eval gsm8k-qalign gsm8k-ancestral --database sqlite:///runs.sqlite
    """
    from qalign.analysis.evaluate import evaluate_sweep

    with _clean_errors():
        sessions = _sessions(database, upgrade=False)
        for sweep_id, name in _resolve(sessions, sweeps):
            errors: list[str] = []
            c = evaluate_sweep(
                sessions,
                sweep_id,
                task=task,
                progress=not quiet,
                workers=workers,
                on_error=errors.append,
            )
            share = f" ({c['correct'] / c['checked']:.1%})" if c["checked"] else ""
            click.echo(
                f"sweep {name!r}: checked {c['checked']} proposals ({c['distinct']} distinct "
                f"responses), {c['correct']} correct{share}"
            )
            if c["errors"] and c["errors"] == c["distinct"]:
                raise click.ClickException(
                    f"the checker raised on every response of {name!r} (stored as wrong), "
                    f"e.g. {errors[0]}"
                )
            if c["errors"]:
                click.echo(
                    f"warning: the checker raised on {c['errors']} distinct response(s) of "
                    f"{name!r}, e.g. {errors[0]}; they count as wrong (answers.details)",
                    err=True,
                )


# ---- qalign predict ------------------------------------------------------------------------


def _f(x: float | None, spec: str = ".3f") -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return format(x, spec)


@click.command("predict")
@click.argument("sweeps", metavar="SWEEP...", nargs=-1, required=True)
@click.option(
    "--method",
    type=click.Choice(METHOD_CHOICES),
    required=True,
    help="mv, wmv, bon, mbr: over an ancestral run's samples; qalign: over QAlign/QUEST "
    "chains; power: over power chains; smc (weighted) and smc-mv (plain): majority vote of an "
    "smc run's final particles.",
)
@click.option(
    "--select",
    type=click.Choice(["mv", "mbr"]),
    default="mv",
    show_default=True,
    help="QAlign: majority vote over the states, or MBR (ROUGE-1) for free-form tasks.",
)
@click.option("--run", "runs", multiple=True, help="Only runs whose sweep/name contains this.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_analysis_options
def predict_command(
    sweeps: tuple[str, ...],
    method: str,
    select: str,
    runs: tuple[str, ...],
    as_json: bool,
    **kw: Any,
) -> None:
    """Accuracy of one method per run and budget, with bootstrap intervals and compute.

    MV, WMV, BoN and MBR choose among the independent samples of `ancestral` runs; QAlign votes
    over the states of `qalign` / `quest` chains (after --burn-in, every --thin-th state), and
    power the same way over `power` chains. A budget is the number of generations per prompt
    (samples, or chain steps with step 0 included). SMC votes over each prompt's final
    particles (smc: weighted by exp(log_weight), self-normalised; smc-mv: unweighted): one
    point per run, its budget the particles, its cost every block (--budgets do not apply).
    Needs `qalign eval` first.

    Example: qalign predict gsm8k-qalign --method qalign --budgets 1,2,4,8 --burn-in 2
    """
    from qalign.analysis.report import curves

    with _clean_errors():
        settings = _settings(kw, select)
        sessions = _sessions(kw["database"], upgrade=False)
        result = curves(sessions, _resolve(sessions, sweeps), method, settings, runs=runs)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in result], indent=2))
        return
    click.echo(f"{result[0].method_name if result else method}: {settings.describe()}")
    ci = f"{settings.confidence:.0%} CI"
    from qalign.analysis.names import text_table

    header = ["run", "budget", "accuracy", ci, "prompts", "gen tok/prompt", "RM tok/prompt"]
    header += ["server s/prompt"]
    header += ["FLOPs/prompt"] if settings.params else []
    table = [
        [
            c.run.label,  # in full: runs of several sweeps differ in more than grid axes
            str(p.budget),
            _f(p.accuracy),
            f"[{_f(p.ci_low)}, {_f(p.ci_high)}]",
            str(p.prompts),
            _f(p.gen_tokens, ".1f"),
            _f(p.reward_tokens, ".1f"),
            _f(p.server_seconds, ".3g"),
            *([_f(p.flops, ".3g")] if settings.params else []),
        ]
        for c in result
        for p in c.points
    ]
    for line in text_table(header, table, right=len(header) - 1):
        click.echo(line)
    for c in result:
        skipped = sorted(set(settings.budgets or ()) - {p.budget for p in c.points})
        if skipped and c.method not in ("smc", "smc-mv"):  # SMC has its one point, no budgets
            click.echo(
                f"note: {c.run.label} has fewer generations per prompt than budget(s) "
                f"{', '.join(map(str, skipped))}; skipped",
                err=True,
            )
        if c.method in ("mv", "wmv") and c.points and all(p.accuracy == 0 for p in c.points):
            click.echo(
                f"note: {c.run.label} never got a right vote; for tasks whose answers cannot be "
                "voted on (IFEval) use --method mbr",
                err=True,
            )


# ---- qalign report -------------------------------------------------------------------------


@click.command("report")
@click.argument("sweeps", metavar="SWEEP...", nargs=-1, required=True)
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for report.md, report.json and the PNG plots.",
)
@_analysis_options
def report_command(sweeps: tuple[str, ...], out_dir: str, **kw: Any) -> None:
    """Write OUT/report.md: runs, accuracy with intervals per budget and compute per task and
    method, convergence diagnostics of the chains (R-hat, bulk and tail ESS of the states'
    reward and length), and PNG plots (error vs compute, acceptance rate and reward traces per
    step, accuracy vs β). Needs `qalign eval` first.

    Baselines come from `ancestral` runs (MV, WMV, BoN; MBR for tasks whose answers cannot be
    voted on), QAlign / QUEST / power from chain runs, the SMC votes from `smc` runs; give
    several sweeps to compare them: every method of a task shares one comparison figure and
    table (error vs tokens, FLOPs with --generator-params, server seconds where stored).

    Example: qalign report qa-sweep anc-sweep -o report/ --generator-params 8e9 --reward-params 8e9
    """
    from qalign.analysis.report import write_report

    with _clean_errors():
        settings = _settings(kw)
        sessions = _sessions(kw["database"], upgrade=False)
        path = write_report(
            sessions,
            _resolve(sessions, sweeps),
            Path(out_dir),
            settings,
            progress=lambda msg: click.echo(msg, err=True),
        )
    click.echo(f"wrote {path}")


__all__ = ["eval_command", "predict_command", "report_command"]


@click.command("score")
@click.argument("sweep")
@click.option("--reward-url", multiple=True, help="Reward server URL (repeat for replicas).")
@click.option("--reward-model", help="Served reward model name.")
@click.option(
    "--reward-format",
    type=click.Choice(["vllm", "vllm-pooling", "sglang", "auto"]),
    default="auto",
    show_default=True,
)
@click.option("--force", is_flag=True, help="Rescore proposals that already have a reward.")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
def score_command(
    sweep: str,
    reward_url: tuple[str, ...],
    reward_model: str | None,
    reward_format: str,
    force: bool,
    database: str | None,
) -> None:
    """Reward-score a sweep's stored samples; each distinct response is scored once per prompt.

    Uses the sweep's own reward section unless --reward-url and --reward-model are given.

    Example: qalign score gsm8k-ancestral --reward-url http://rm:8001 --reward-model skywork-rm
    """
    from qalign.analysis.score import run_score
    from qalign.clients.spec import RewardSpec
    from qalign.storage import repo

    if bool(reward_url) != bool(reward_model):
        raise click.UsageError("--reward-url and --reward-model go together")
    section = None
    if reward_url and reward_model:
        section = RewardSpec(format=reward_format, urls=tuple(reward_url), model=reward_model)
    sessions = _sessions(database, upgrade=False)
    sweep_id = repo.find_sweep(sessions, sweep).id
    counts = run_score(sessions, sweep_id, section, force=force)
    click.echo(
        f"scored {counts['proposals']} proposal(s) with {counts['distinct']} distinct "
        "(prompt, response) pair(s)"
    )
