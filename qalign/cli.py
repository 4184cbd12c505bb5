"""The `qalign` command line."""

from __future__ import annotations

import collections
import importlib
import json
import sys

import click

from qalign import __version__

# Errors a user can act on, as (module, class). Importing these modules up front (pydantic,
# aiohttp, numpy through the analysis code) cost `qalign sweep status` most of its 1 s start-up;
# an error can only be raised once its module is loaded, so only loaded modules are consulted.
_USER_ERRORS = (
    ("qalign.analysis.data", "AnalysisError"),
    ("qalign.config", "ConfigError"),
    ("qalign.clients.errors", "ClientError"),
    ("qalign.storage.errors", "StorageError"),
    ("qalign.storage.repo", "SweepExistsError"),
    ("qalign.storage.repo", "SweepNotFoundError"),
    ("qalign.storage.repo", "ExtendError"),
    ("qalign.storage.repo", "WarmStartError"),
)

# Commands whose modules are heavy and which most invocations do not need (the toy server pulls
# in aiohttp's web framework): imported when named, or when every command is listed (--help).
_LAZY_COMMANDS = {
    "toy-server": ("qalign.toy.cli", "toy_server_command"),
    "dashboard": ("qalign.dashboard.cli", "dashboard_command"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[m], c) for m, c in _USER_ERRORS if m in sys.modules)


class _Group(click.Group):
    """Turns the errors a user can act on into one clean message (no traceback)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                raise click.ClickException(str(exc)) from None
            raise

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            module, attr = _LAZY_COMMANDS[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), name=cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qalign")
def main() -> None:
    """Exact QAlign / QUEST test-time alignment against served language models."""


def _register_commands() -> None:
    from qalign.cli_db import db_group
    from qalign.cli_sweep import export_command, run_command, sweep_group, worker_command

    main.add_command(db_group, name="db")
    main.add_command(sweep_group, name="sweep")
    main.add_command(run_command, name="run")
    main.add_command(worker_command, name="worker")
    main.add_command(export_command, name="export")
    from qalign.cli_analysis import eval_command, predict_command, report_command, score_command

    main.add_command(eval_command, name="eval")
    main.add_command(predict_command, name="predict")
    main.add_command(report_command, name="report")
    main.add_command(score_command, name="score")


_register_commands()


@main.command()
@click.option("--chains", default=200, show_default=True, help="Independent chains to run.")
@click.option("--steps", default=20, show_default=True, help="MCMC steps per chain.")
@click.option("--beta", default=1.0, show_default=True, help="Reward temperature.")
@click.option("--seed", default=0, show_default=True, help="Run seed.")
@click.option("--database", help="Where to store the sweep (default: a new SQLite file).")
@click.option("--json-out", "json_out", is_flag=True, help="Print the summary as JSON.")
def demo(
    chains: int, steps: int, beta: float, seed: int, database: str | None, json_out: bool
) -> None:
    """Run a QAlign sweep against two local toy servers and compare with the exact target.

    Starts a toy generator and a toy reward model on free local ports (no external services),
    stores a sweep in SQLite, runs CHAINS chains of STEPS steps through the same runner as
    `qalign run`, and prints where the chains ended next to the exact target distribution.

    Example: qalign demo --chains 200 --steps 20 --beta 1.0
    """
    import tempfile

    from sqlalchemy import select

    from qalign.cli_sweep import print_status
    from qalign.config import parse_config
    from qalign.core import KernelConfig
    from qalign.sampling.loop import run_sync
    from qalign.scheduler.local import run_locally
    from qalign.scheduler.sweeps import create_sweep
    from qalign.steps.service import StepService
    from qalign.storage import ensure_schema, make_engine, make_sessionmaker, redact_url
    from qalign.storage.models import Chain
    from qalign.toy.exact import step_distribution, total_variation, transition_matrix, tv_bound
    from qalign.toy.model import ToyModel
    from qalign.toy.server import ToyServerOptions, serve_in_thread

    max_new = 3
    toy = ToyModel()
    url = database or f"sqlite:///{tempfile.mkdtemp(prefix='qalign-demo-')}/demo.sqlite"
    gen_opts = ToyServerOptions(served_model_names=("toy-lm",), port=0)
    rm_opts = ToyServerOptions(served_model_names=("toy-rm",), port=0)
    with serve_in_thread(gen_opts) as gen_srv, serve_in_thread(rm_opts) as rm_srv:
        click.echo(f"toy generator at {gen_srv.url}, toy reward model at {rm_srv.url}", err=True)
        cfg = parse_config(
            {
                "name": f"demo-beta{beta:g}-steps{steps}-chains{chains}-seed{seed}",
                "generator": {"urls": [gen_srv.url], "model": "toy-lm"},
                "reward": {"urls": [rm_srv.url], "model": "toy-rm", "format": "vllm"},
                "dataset": {"prompts": ["Should we ship it? Answer yes, no, maybe, so."]},
                "beta": beta,
                "steps": steps,
                "chains_per_prompt": chains,
                "seed": seed,
                "max_new_tokens": max_new,
                "max_prompt_length": 64,
            },
            "demo config",
        )
        shown = redact_url(url)
        ensure_schema(url)
        sessions = make_sessionmaker(make_engine(url))
        sweep_id, _ = create_sweep(sessions, cfg)
        click.echo(f"sweep {cfg.name!r} stored in {shown}", err=True)
        service = StepService(sessions, concurrency=64)

        async def go() -> object:
            try:
                return await run_locally(service, sweep_id)
            finally:
                await service.close()

        run_sync(go())
    with sessions() as s:
        finals = [tuple(t) for t in s.execute(select(Chain.state_tokens)).scalars()]
    counts = collections.Counter(finals)
    empirical = {y: c / len(finals) for y, c in counts.items()}
    target = toy.target(beta, max_new)
    exact_k = step_distribution(
        toy.lm_distribution(max_new),
        transition_matrix(toy, KernelConfig(beta=beta, max_new_tokens=max_new)),
        steps,
    )
    top = [
        {"response": toy.decode(y), "chains": empirical.get(y, 0.0), "target": p}
        for y, p in sorted(target.items(), key=lambda kv: -kv[1])[:8]
    ]
    summary = {
        "database": shown,
        "chains": len(finals),
        "steps": steps,
        "beta": beta,
        "tv_to_target": total_variation(empirical, target),
        "tv_to_exact_law_after_steps": total_variation(empirical, exact_k),
        "tv_allowed_by_sampling_noise": tv_bound(exact_k, len(finals)),
        "exact_law_tv_to_target": total_variation(exact_k, target),
        "top": top,
    }
    if json_out:
        click.echo(json.dumps(summary, indent=2))
        return
    print_status(sessions, sweep_id, as_json=False)
    click.echo(f"\n{'final response':<24} {'chains':>8} {'exact target':>13}")
    for row in top:
        click.echo(f"{row['response']:<24} {row['chains']:>8.3f} {row['target']:>13.3f}")
    click.echo(
        f"\ntotal variation to the exact law after {steps} steps: "
        f"{summary['tv_to_exact_law_after_steps']:.3f} (sampling noise with {len(finals)} chains "
        f"allows up to {summary['tv_allowed_by_sampling_noise']:.3f}); that law is itself "
        f"{summary['exact_law_tv_to_target']:.3f} from the target, and converges to it with steps."
    )
    click.echo(
        f"every proposal is in {shown}: try `qalign sweep status {cfg.name} --database {shown}`"
    )


if __name__ == "__main__":
    main()
