"""`qalign run`, `qalign sweep ...`, `qalign worker`: creating, executing and inspecting sweeps."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import click

DB_HELP = "Database URL (default: $QALIGN_DATABASE_URL, else sqlite:///qalign.sqlite)."
BROKER_HELP = "Celery broker URL (default: $QALIGN_BROKER_URL, else redis://127.0.0.1:6379/0)."
QUEUE_OPTION = click.option(
    "--queue",
    envvar="QALIGN_QUEUE",
    default="qalign",
    show_default=True,
    help="Celery queue of step messages ($QALIGN_QUEUE).",
)


def _fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def _sessions(database: str | None, *, upgrade: bool) -> Any:
    from qalign.storage.engine import database_url, make_engine, make_sessionmaker
    from qalign.storage.migrate import check_schema, ensure_schema

    url = database_url(database)
    if upgrade:
        ensure_schema(url)
    engine = make_engine(url)
    if not upgrade:
        check_schema(engine)
    return make_sessionmaker(engine)


def _load(config_path: str) -> Any:
    from qalign.config import load_config

    return load_config(config_path)


def _sweep_id(sessions: Any, ref: str) -> int:
    from qalign.storage import repo

    return int(repo.find_sweep(sessions, ref).id)


def _failure_reasons(sessions: Any, sweep_id: int) -> dict[int, list[dict[str, Any]]]:
    """Per run: why its failed chains failed (the recorded error, most common first)."""
    from sqlalchemy import func, select

    from qalign.storage.models import Chain, ChainStatus, Run

    q = (
        select(Chain.run_id, Chain.last_error, func.count(Chain.id))
        .join(Run, Run.id == Chain.run_id)
        .where(Run.sweep_id == sweep_id, Chain.status == ChainStatus.FAILED.value)
        .group_by(Chain.run_id, Chain.last_error)
    )
    out: dict[int, list[dict[str, Any]]] = {}
    with sessions() as s:
        for run_id, error, n in s.execute(q):
            out.setdefault(run_id, []).append({"reason": error or "(none recorded)", "chains": n})
    for reasons in out.values():
        reasons.sort(key=lambda r: (-r["chains"], r["reason"]))
    return out


def _status_rows(sessions: Any, sweep_id: int, *, diagnostics: bool = True) -> list[dict[str, Any]]:
    from qalign.analysis.progress import eta as time_left
    from qalign.analysis.progress import throughput as steps_per_s
    from qalign.storage import repo

    now = dt.datetime.now(dt.UTC)
    failures = _failure_reasons(sessions, sweep_id)
    retired = repo.converged_prompts(sessions, sweep_id)
    rows = []
    for r in repo.sweep_status(sessions, sweep_id):
        diag = _diagnostics(sessions, r.run_id, r.method) if diagnostics else None
        throughput = steps_per_s(
            r.steps_done, r.first_at, r.last_at, r.extended_at, r.steps_done_at_extension
        )
        eta = time_left(r.steps_total - r.steps_done, throughput)
        rows.append(
            {
                "run_id": r.run_id,
                "run": r.name,
                "method": r.method,
                "generator_model": r.generator_model,
                "beta": r.beta,
                "temperature": r.temperature,
                "steps": r.steps,
                "chains_done": r.chains_done,
                "chains_total": r.chains,
                "chains_failed": r.chains_failed,
                "chains_cancelled": r.chains_cancelled,
                "chains_converged": r.chains_converged,
                "prompts_converged": r.prompts_converged,
                "converged_prompts": retired.get(r.run_id, []),
                "steps_done": r.steps_done,
                "steps_total": r.steps_total,
                "acceptance_rate": r.acceptance_rate,
                "mean_state_reward": r.mean_state_reward,
                "errors": r.chains_with_errors,
                "step_errors": r.step_errors,
                "error_kinds": r.error_kinds,
                "rejected_with_reason": r.rejected_with_reason,
                "steps_per_s": throughput,
                "eta_s": eta,
                "failures": failures.get(r.run_id, []),
                "extended_at": None if r.extended_at is None else r.extended_at.isoformat(),
                "diagnostics": diag,
                "as_of": now.isoformat(),
            }
        )
    return rows


def _diagnostics(sessions: Any, run_id: int, method: str) -> Any:
    """The `RunDiagnostics` of a chain run; None for runs without chains."""
    from qalign.analysis.convergence import run_diagnostics
    from qalign.analysis.data import CHAIN_RUN_METHODS

    return run_diagnostics(sessions, run_id) if method in CHAIN_RUN_METHODS else None


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _pair(d: Any, value: Any, spec: str) -> str:
    """`reward/length` of one pooled diagnostic, e.g. "1.02/1.10"; "-" where undefined."""
    if d is None:
        return "-"
    return "/".join(_fmt(value(d.pooled(q)), spec) for q in ("reward", "length"))


def print_status(sessions: Any, sweep_id: int, as_json: bool, *, diagnostics: bool = True) -> None:
    rows = _status_rows(sessions, sweep_id, diagnostics=diagnostics)
    if as_json:
        from qalign.storage.export import json_safe

        out = [{**r, "diagnostics": r["diagnostics"] and r["diagnostics"].to_json()} for r in rows]
        # Strict JSON: consumers such as jq reject the Infinity/NaN tokens Python would print.
        click.echo(json.dumps(json_safe(out), indent=2, allow_nan=False))
        return
    from qalign.analysis.names import run_columns, text_table

    names, cells = run_columns(rows, name_key="run")
    header = ["chains", "converged", "steps", "accept", "state reward", "errors", "step/s", "eta"]
    if diagnostics:
        header += ["rhat r/l", "ess r/l"]
    table = []
    for r, first in zip(rows, cells, strict=True):
        eta = "-" if r["eta_s"] is None else str(dt.timedelta(seconds=round(r["eta_s"])))
        line = [
            *first,
            f"{r['chains_done'] + r['chains_converged']}/{r['chains_total']}",
            str(r["prompts_converged"]) if r["chains_converged"] else "-",
            f"{r['steps_done']}/{r['steps_total']}",
            _fmt(r["acceptance_rate"], ".2f"),
            _fmt(r["mean_state_reward"]),
            str(r["errors"] + r["chains_failed"]),
            _fmt(r["steps_per_s"], ".1f"),
            eta,
        ]
        if diagnostics:
            d = r["diagnostics"]
            line += [_pair(d, lambda p: p.rhat_max, ".2f"), _pair(d, lambda p: p.ess_min, ".0f")]
        table.append(line)
    for text in text_table([*names, *header], table, right=len(header)):
        click.echo(text)
    click.echo(
        "chains: finished (done or converged) / all; converged: prompts whose chains stop_when "
        "retired\nstate reward: mean reward of current states (each chain's last accepted "
        "proposal), not of all proposals"
    )
    if diagnostics and any(r["diagnostics"] is not None for r in rows):
        click.echo(
            "rhat r/l: the largest rank-normalised split-R-hat over prompts of the chain states' "
            "reward / length (want <= 1.01)\n"
            "ess r/l:  the smallest bulk or tail ESS over prompts (--json: medians, bulk and tail)"
        )
    for r in rows:
        for f in r["failures"][:5]:
            click.echo(f"failed: {r['run']}: {f['chains']} chain(s): {f['reason']}")
    _print_errors(sessions, sweep_id)


def _print_errors(sessions: Any, sweep_id: int) -> None:
    """Failed step attempts by run and kind, kept after the retries succeeded."""
    from qalign.storage import repo

    summary = repo.error_summary(sessions, sweep_id)
    if not summary:
        return
    total = sum(e.count for e in summary)
    click.echo(f"\nfailed step attempts: {total} (retried; a chain fails after max_attempts)")
    for e in summary:
        last = " ".join(e.last_error.split())
        click.echo(f"  {e.run_name}: {e.kind} x{e.count}; last: {last[:160]}")


# ---- qalign run ------------------------------------------------------------------------------


@click.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--concurrency", type=click.IntRange(1), help="Steps in flight (default: config).")
@click.option("--retry-failed", is_flag=True, help="Give failed chains another round of attempts.")
@click.option("--no-check", is_flag=True, help="Do not contact the servers before writing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--lockstep",
    is_flag=True,
    help="Make every chain wait for the slowest at each step (for benchmarks only).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: off).",
)
@click.option(
    "--metrics-linger",
    is_flag=True,
    help="After the run, keep serving /metrics until interrupted (Ctrl-C or SIGTERM), so a "
    "scraper sees the final counts.",
)
def run_command(
    config_path: str,
    database: str | None,
    concurrency: int | None,
    retry_failed: bool,
    no_check: bool,
    quiet: bool,
    lockstep: bool,
    metrics_port: int,
    metrics_linger: bool,
) -> None:
    """Create the sweep in CONFIG (if new) and run it here, with no broker.

    The database defaults to SQLite (./qalign.sqlite). Running the same command again resumes
    every chain from its last committed step; interrupting with Ctrl-C loses at most the steps in
    flight. After `qalign sweep extend NAME --steps N`, the same command (the same CONFIG)
    continues every chain to the stored N steps.

    Example: qalign run sweep.yaml --database sqlite:///runs.sqlite
    """
    from qalign.scheduler.sweeps import create_sweep, sweep_prompts

    if metrics_linger and not metrics_port:
        raise click.UsageError("--metrics-linger needs --metrics-port")
    cfg = _load(config_path)
    prompts = sweep_prompts(cfg)  # a sweep over the size limits must not create the database
    sessions = _sessions(database, upgrade=True)
    sweep_id, created = create_sweep(sessions, cfg, check=not no_check, prompts=prompts)
    click.echo(
        f"{'created' if created else 'resuming'} sweep {cfg.name!r} (id {sweep_id})", err=True
    )
    _run_here(
        sessions,
        sweep_id,
        concurrency=concurrency,
        retry_failed=retry_failed,
        quiet=quiet,
        lockstep=lockstep,
        again="run the same command again",
        metrics_port=metrics_port,
        metrics_linger=metrics_linger,
    )


def _run_here(
    sessions: Any,
    sweep_id: int,
    *,
    concurrency: int | None,
    retry_failed: bool,
    quiet: bool,
    again: str,
    lockstep: bool = False,
    metrics_port: int = 0,
    metrics_linger: bool = False,
) -> None:
    """Run every unfinished chain of the sweep in this process (the embedded runner), print
    its status, and fail if any chain failed."""
    from qalign.steps.metrics import MetricsPortError, StepMetrics, serve_metrics
    from qalign.storage import repo

    metrics = StepMetrics()
    server = None
    if metrics_port:
        try:
            server = serve_metrics(metrics, metrics_port)
        except MetricsPortError as exc:
            _fail(str(exc))
        click.echo(f"serving metrics at {server.url}", err=True)
    try:
        failed_here = _run_with(
            sessions, sweep_id, metrics, concurrency, retry_failed, quiet, again, lockstep
        )
        if server is not None and metrics_linger:
            _linger(server.url)
    finally:
        if server is not None:
            server.close()
    # Chains that failed in an earlier run count too: the sweep is not complete.
    failed_chains = max(_failed_chains(sessions, sweep_id), failed_here)
    if failed_chains:
        config = repo.find_sweep(sessions, sweep_id).config
        attempts = (config.get("execution") or {}).get("max_attempts", "?")
        _fail(
            f"{failed_chains} chain(s) failed (execution.max_attempts="
            f"{attempts}); see `qalign sweep status` and rerun with --retry-failed"
        )


def _linger(url: str) -> None:
    """Keep the process (and its /metrics thread) up until Ctrl-C or SIGTERM."""
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo(f"run finished; serving {url} until interrupted", err=True)
    try:
        # A timeout, so the main thread wakes up to run Python's Ctrl-C handler.
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failed_chains(sessions: Any, sweep_id: int) -> int:
    from qalign.storage import repo

    return sum(r.chains_failed for r in repo.sweep_status(sessions, sweep_id))


def _run_with(
    sessions: Any,
    sweep_id: int,
    metrics: Any,
    concurrency: int | None,
    retry_failed: bool,
    quiet: bool,
    again: str,
    lockstep: bool,
) -> int:
    """The embedded run itself, then the sweep's status; returns the chains failed in it."""
    from qalign.sampling.loop import run_sync
    from qalign.scheduler.local import run_locally
    from qalign.steps.service import StepService

    service = StepService(sessions, concurrency=concurrency, metrics=metrics)

    async def go() -> Any:
        try:
            return await run_locally(
                service,
                sweep_id,
                retry_failed=retry_failed,
                progress=not quiet,
                lockstep=lockstep,
            )
        finally:
            await service.close()

    try:
        report = run_sync(go())
    except KeyboardInterrupt:
        click.echo(f"interrupted: {again} to resume", err=True)
        sys.exit(130)
    print_status(sessions, sweep_id, as_json=False)
    return len(report.failed_chains)


# ---- qalign sweep ... ------------------------------------------------------------------------


@click.group("sweep")
def sweep_group() -> None:
    """Create, run, inspect, resume and cancel sweeps (distributed through Celery)."""


@sweep_group.command("create")
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--no-check", is_flag=True, help="Do not contact the servers before writing.")
def sweep_create(config_path: str, database: str | None, no_check: bool) -> None:
    """Validate CONFIG, check its servers, and write its runs, prompts and chains.

    Creating the same sweep again changes nothing.

    Example: qalign sweep create sweep.yaml --database postgresql://user@db/qalign
    """
    from qalign.scheduler.sweeps import create_sweep, sweep_prompts

    cfg = _load(config_path)
    prompts = sweep_prompts(cfg)  # size limits first: nothing is opened for a refused sweep
    sessions = _sessions(database, upgrade=False)
    sweep_id, created = create_sweep(sessions, cfg, check=not no_check, prompts=prompts)
    click.echo(f"{'created' if created else 'exists:'} sweep {cfg.name!r} (id {sweep_id})")


@sweep_group.command("list")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def sweep_list(database: str | None, as_json: bool) -> None:
    """List the sweeps in the database.

    Example: qalign sweep list --json
    """
    from qalign.storage import repo

    rows = [
        {"id": s.id, "name": s.name, "status": s.status, "created_at": s.created_at.isoformat()}
        for s in repo.list_sweeps(_sessions(database, upgrade=False))
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['id']:>5}  {r['name']:<40} {r['status']:<10} {r['created_at']}")


@sweep_group.command("show")
@click.argument("sweep")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
def sweep_show(sweep: str, database: str | None) -> None:
    """Print a sweep's config and its runs.

    Example: qalign sweep show my-sweep
    """
    import yaml

    from qalign.storage import repo

    sessions = _sessions(database, upgrade=False)
    s = repo.find_sweep(sessions, sweep)
    shown: dict[str, Any] = {"id": s.id, "status": s.status, "config": s.config}
    extensions = repo.sweep_extensions(sessions, s.id)
    if extensions:
        shown["extensions"] = extensions  # the config's `steps` are those it was created with
    click.echo(yaml.safe_dump(shown, sort_keys=False))


@sweep_group.command("run")
@click.argument("sweep")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--broker", envvar="QALIGN_BROKER_URL", help=BROKER_HELP)
@QUEUE_OPTION
def sweep_run(sweep: str, database: str | None, broker: str | None, queue: str) -> None:
    """Enqueue the next step of every unfinished chain for the Celery workers.

    Example: qalign sweep run my-sweep   (then start workers with `qalign worker`)
    """
    _enqueue(sweep, database, broker, queue, retry_failed=False)


@sweep_group.command("resume")
@click.argument("sweep")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--broker", envvar="QALIGN_BROKER_URL", help=BROKER_HELP)
@QUEUE_OPTION
@click.option("--retry-failed", is_flag=True, help="Also revive chains that ran out of attempts.")
def sweep_resume(
    sweep: str, database: str | None, broker: str | None, queue: str, retry_failed: bool
) -> None:
    """Re-enqueue every unfinished chain from its last committed step.

    Safe at any time (duplicates are harmless) and works after the broker lost every message.

    Example: qalign sweep resume my-sweep --retry-failed
    """
    _enqueue(sweep, database, broker, queue, retry_failed=retry_failed)


def _enqueue(
    sweep: str, database: str | None, broker: str | None, queue: str, *, retry_failed: bool
) -> None:
    from qalign.scheduler.sweeps import enqueue_unfinished

    sessions = _sessions(database, upgrade=False)
    sweep_id = _sweep_id(sessions, sweep)
    dispatcher = _dispatcher(broker, queue)
    with _broker_errors(dispatcher.app.conf.broker_url):
        n = enqueue_unfinished(sessions, sweep_id, dispatcher, retry_failed=retry_failed)
    click.echo(f"enqueued {n} chain step(s) of sweep {sweep!r}")


def _broker_settings(broker: str | None, queue: str) -> Any:
    from qalign.dispatch.celery import DEFAULT_BROKER, BrokerSettings

    return BrokerSettings(url=broker or DEFAULT_BROKER, queue=queue)


def _dispatcher(broker: str | None, queue: str) -> Any:
    from qalign.dispatch.celery import CeleryDispatcher, celery_app

    return CeleryDispatcher(celery_app(_broker_settings(broker, queue)))


@contextlib.contextmanager
def _broker_errors(url: str, hint: str = "") -> Iterator[None]:
    """Turn "cannot reach the broker" into one line naming the broker (password hidden)."""
    from kombu.exceptions import OperationalError

    from qalign.storage.engine import redact_password, redact_url

    try:
        yield
    except OperationalError as exc:
        detail = redact_password(str(exc), url)
        _fail(
            f"cannot reach the Celery broker {redact_url(url)}: {detail}. Is it running? Choose "
            "it with --broker or $QALIGN_BROKER_URL." + hint
        )


@sweep_group.command("extend")
@click.argument("sweep")
@click.option(
    "--steps",
    required=True,
    type=click.IntRange(1),
    help="The new number of MCMC steps per chain (larger than the runs' current steps).",
)
@click.option(
    "--run",
    "runs",
    multiple=True,
    metavar="RUN",
    help="Extend only this run (its name or id: `sweep status --json`); repeatable. Default: all.",
)
@click.option("--local", is_flag=True, help="Run the extension here (embedded runner, no broker).")
@click.option("--no-enqueue", is_flag=True, help="Only record the extension; continue it later.")
@click.option("--retry-failed", is_flag=True, help="Also revive chains that ran out of attempts.")
@click.option("--concurrency", type=click.IntRange(1), help="With --local: steps in flight.")
@click.option("--quiet", is_flag=True, help="With --local: no progress bars.")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--broker", envvar="QALIGN_BROKER_URL", help=BROKER_HELP)
@QUEUE_OPTION
def sweep_extend(
    sweep: str,
    steps: int,
    runs: tuple[str, ...],
    local: bool,
    no_enqueue: bool,
    retry_failed: bool,
    concurrency: int | None,
    quiet: bool,
    database: str | None,
    broker: str | None,
    queue: str,
) -> None:
    """Give every chain of SWEEP (or of the --run runs) STEPS steps, and continue each chain
    from its last committed step.

    A chain extended from N to STEPS steps is identical, proposal for proposal, to a chain run
    for STEPS steps from the start (randomness is a function of (seed, chain, step)), and only
    the new steps are generated. The new target is stored: finished chains become pending again,
    failed chains stay failed (unless --retry-failed), and every extension is recorded in
    `sweep_extensions` (shown by `sweep show`). Run names keep the steps they were created
    with; `runs.steps` holds the current target.

    How the new steps run: by default the next step of every unfinished chain is enqueued for
    the Celery workers (as `sweep resume` does); with --local they run here, as `qalign run`
    would; with --no-enqueue nothing runs yet: `qalign run CONFIG` with the config the sweep was
    created with, or `qalign sweep resume`, continues it later.

    Example: qalign sweep extend my-sweep --steps 20 --local
    """
    from qalign.scheduler.sweeps import enqueue_unfinished, extend_sweep

    if local and no_enqueue:
        _fail("--local runs the extension here; --no-enqueue runs nothing: give one of them")
    sessions = _sessions(database, upgrade=False)
    sweep_id = _sweep_id(sessions, sweep)
    for e in extend_sweep(sessions, sweep_id, steps, list(runs) or None):
        failed = f", {e.failed} failed chain(s) stay failed" if e.failed else ""
        if e.failed and retry_failed:
            failed = f", {e.failed} failed chain(s) get another round"
        click.echo(
            f"extended {e.run}: {e.old_steps} -> {e.new_steps} steps per chain "
            f"({e.reopened} finished chain(s) reopened{failed})"
        )
    if local:
        _run_here(
            sessions,
            sweep_id,
            concurrency=concurrency,
            retry_failed=retry_failed,
            quiet=quiet,
            again=f"`qalign sweep resume {sweep}` or `qalign run CONFIG`",
        )
        return
    if no_enqueue:
        click.echo(
            f"recorded; continue with `qalign run CONFIG` (here) or `qalign sweep resume {sweep}` "
            "(Celery workers)"
        )
        return
    dispatcher = _dispatcher(broker, queue)
    recorded = f" The extension is recorded: `qalign sweep resume {sweep}` enqueues it."
    with _broker_errors(dispatcher.app.conf.broker_url, hint=recorded):
        n = enqueue_unfinished(sessions, sweep_id, dispatcher, retry_failed=retry_failed)
    click.echo(f"enqueued {n} chain step(s) of sweep {sweep!r}")


@sweep_group.command("cancel")
@click.argument("sweep")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
def sweep_cancel(sweep: str, database: str | None) -> None:
    """Stop a sweep: queued steps are skipped by the workers; committed work is kept.

    `qalign sweep resume` starts it again.

    Example: qalign sweep cancel my-sweep
    """
    from qalign.storage import repo

    sessions = _sessions(database, upgrade=False)
    n = repo.cancel_sweep(sessions, _sweep_id(sessions, sweep))
    click.echo(f"cancelled sweep {sweep!r} ({n} unfinished chain(s))")


@sweep_group.command("status")
@click.argument("sweep")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--no-diagnostics",
    is_flag=True,
    help="Skip R-hat and ESS: they read every proposal of the sweep, the rest reads only chains.",
)
def sweep_status(sweep: str, database: str | None, as_json: bool, no_diagnostics: bool) -> None:
    """Per run: chains and steps done, prompts retired by stop_when, acceptance rate, mean reward
    of current states, errors, throughput, ETA, and the convergence diagnostics of chain runs
    (R-hat, bulk and tail ESS; Vehtari et al. 2021) of the states' reward and response length.

    Example: qalign sweep status my-sweep --json
    """
    sessions = _sessions(database, upgrade=False)
    print_status(sessions, _sweep_id(sessions, sweep), as_json, diagnostics=not no_diagnostics)


@sweep_group.command("reap")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--broker", envvar="QALIGN_BROKER_URL", help=BROKER_HELP)
@QUEUE_OPTION
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0),
    help="Seconds without progress (default: each sweep's execution.stall_timeout).",
)
@click.option("--every", type=click.FloatRange(min=0, min_open=True),
              help="Keep running, reaping every this many seconds.")  # fmt: skip
def sweep_reap(
    database: str | None,
    broker: str | None,
    queue: str,
    stall_timeout: float | None,
    every: float | None,
) -> None:
    """Re-enqueue chains of active sweeps that made no progress for their stall timeout.

    Each sweep's own `execution.stall_timeout` applies unless --stall-timeout overrides it for
    all of them.

    Example: qalign sweep reap --every 60
    """
    from qalign.scheduler.sweeps import reap

    sessions = _sessions(database, upgrade=False)
    dispatcher = _dispatcher(broker, queue)
    while True:
        with _broker_errors(dispatcher.app.conf.broker_url):
            n = reap(sessions, dispatcher, stall_timeout)
        click.echo(f"{dt.datetime.now(dt.UTC).isoformat()} re-enqueued {n} stalled chain(s)")
        if every is None:
            return
        time.sleep(every)


# ---- qalign worker ---------------------------------------------------------------------------


def _wait_for_database(url: str, wait: float) -> None:
    """Check the schema, waiting up to `wait` seconds while the server is unreachable.

    A worker restarted by its supervisor while PostgreSQL restarts must not die (Celery waits
    for the broker the same way); a wrong URL, bad credentials or an old schema fail at once.
    """
    from qalign.storage.errors import DatabaseConnectionError, DatabaseUnreachableError

    deadline = time.monotonic() + wait
    while True:
        try:
            _sessions(url, upgrade=False)
            return
        except DatabaseConnectionError as exc:
            transient = isinstance(exc, DatabaseUnreachableError) or (
                "the database system is" in str(exc)  # starting up / shutting down
            )
            if not transient or time.monotonic() >= deadline:
                raise
            click.echo(f"waiting for the database: {exc}", err=True)
            time.sleep(2.0)


@click.command("worker")
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
@click.option("--broker", envvar="QALIGN_BROKER_URL", help=BROKER_HELP)
@QUEUE_OPTION
@click.option(
    "--concurrency",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Threads: steps of any sweep in flight in this process.",
)
@click.option("--name", "node_name", help="Celery node name (default: qalign@<host>-<pid>).")
@click.option(
    "--steps-per-task",
    envvar="QALIGN_STEPS_PER_TASK",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Steps of one chain a task takes before handing the chain on ($QALIGN_STEPS_PER_TASK).",
)
@click.option(
    "--task-budget",
    envvar="QALIGN_TASK_BUDGET_S",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a task keeps one chain before handing it on ($QALIGN_TASK_BUDGET_S).",
)
@click.option(
    "--hand-on",
    envvar="QALIGN_HAND_ON",
    type=click.Choice(["contended", "always"]),
    default="contended",
    show_default=True,
    help="When a task past its budget hands its chain on: only while other chains wait for a "
    "slot (contended), or always ($QALIGN_HAND_ON).",
)
@click.option(
    "--db-wait",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait at start-up for a database that is down or restarting.",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--metrics-port",
    envvar="QALIGN_METRICS_PORT",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: off; "
    "$QALIGN_METRICS_PORT).",
)
def worker_command(
    database: str | None,
    broker: str | None,
    queue: str,
    concurrency: int,
    node_name: str | None,
    steps_per_task: int,
    task_budget: float,
    hand_on: str,
    db_wait: float,
    loglevel: str,
    metrics_port: int,
) -> None:
    """Start a Celery worker that executes chain steps (a thread pool: HTTP-bound work).

    Each sweep's own settings (execution.max_attempts, stall_timeout, concurrency, ...) come
    from the database. Refuses to start unless the database schema is at head
    (`qalign db upgrade`).

    Example: QALIGN_DATABASE_URL=postgresql://db/qalign qalign worker --concurrency 64
    """
    import os
    import socket

    from qalign.steps.metrics import MetricsPortError
    from qalign.storage.engine import database_url
    from qalign.workers.app import run_worker
    from qalign.workers.settings import WorkerSettings

    url = database_url(database)
    _wait_for_database(url, db_wait)  # raises with instructions when not at head
    settings = WorkerSettings(
        database_url=url,
        name=node_name or f"qalign@{socket.gethostname()}-{os.getpid()}",
        broker=_broker_settings(broker, queue),
        concurrency=concurrency,
        steps_per_task=steps_per_task,
        task_budget_s=task_budget,
        hand_on=hand_on,
        loglevel=loglevel,
        metrics_port=metrics_port,
    )
    try:
        code = run_worker(settings)
    except MetricsPortError as exc:
        _fail(str(exc))
    if code:
        sys.exit(code)


# ---- qalign export ---------------------------------------------------------------------------


@click.command("export")
@click.argument("sweep")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "parquet", "both"]),
    default="both",
    show_default=True,
)
@click.option("--database", envvar="QALIGN_DATABASE_URL", help=DB_HELP)
def export_command(sweep: str, out_dir: str, fmt: str, database: str | None) -> None:
    """Write a sweep's chains and every proposal to OUT/chains.* and OUT/proposals.*; a sweep
    with SMC runs also gets OUT/smc_resamples.* and OUT/smc_ancestry.*.

    Example: qalign export my-sweep -o exports/my-sweep --format parquet
    """
    from pathlib import Path

    from qalign.storage.export import export_sweep

    sessions = _sessions(database, upgrade=False)
    formats = {"jsonl", "parquet"} if fmt == "both" else {fmt}
    counts = export_sweep(sessions, _sweep_id(sessions, sweep), Path(out_dir), formats)
    smc = (
        f", {counts['smc_resamples']} SMC resamplings and {counts['smc_ancestry']} ancestry rows"
        if "smc_ancestry" in counts
        else ""
    )
    click.echo(
        f"wrote {counts['chains']} chains and {counts['proposals']} proposals{smc} to {out_dir}"
    )
