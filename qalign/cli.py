"""The `qalign` command line."""

from __future__ import annotations

import collections
import json

import click

from qalign import __version__


class _Group(click.Group):
    """Turns the errors a user can act on into one clean message (no traceback)."""

    def invoke(self, ctx: click.Context) -> object:
        from qalign.clients.errors import ClientError
        from qalign.config import ConfigError
        from qalign.storage import repo
        from qalign.storage.errors import StorageError

        try:
            return super().invoke(ctx)
        except (
            ConfigError,
            ClientError,
            StorageError,
            repo.SweepExistsError,
            repo.SweepNotFoundError,
        ) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qalign")
def main() -> None:
    """Exact QAlign / QUEST test-time alignment against served language models."""


def _register_commands() -> None:
    from qalign.cli_db import db_group
    from qalign.cli_sweep import export_command, run_command, sweep_group, worker_command
    from qalign.toy.cli import toy_server_command

    main.add_command(toy_server_command, name="toy-server")
    main.add_command(db_group, name="db")
    main.add_command(sweep_group, name="sweep")
    main.add_command(run_command, name="run")
    main.add_command(worker_command, name="worker")
    main.add_command(export_command, name="export")


_register_commands()


@main.command()
@click.option("--chains", default=200, show_default=True, help="Independent chains to run.")
@click.option("--steps", default=20, show_default=True, help="MCMC steps per chain.")
@click.option("--beta", default=1.0, show_default=True, help="Reward temperature.")
@click.option("--seed", default=0, show_default=True, help="Run seed.")
@click.option("--json-out", "json_out", is_flag=True, help="Print the summary as JSON.")
def demo(chains: int, steps: int, beta: float, seed: int, json_out: bool) -> None:
    """Run QAlign against two local toy servers and compare with the exact target.

    Starts a toy generator and a toy reward server on free local ports (no external services),
    runs CHAINS chains of STEPS steps through the seed-style API, and prints the most frequent
    final responses next to their exact target probabilities.

    Example: qalign demo --chains 200 --steps 20 --beta 1.0
    """
    from qalign.base import QAlign
    from qalign.model import RemoteVLLM
    from qalign.reward import RemoteReward
    from qalign.toy.exact import total_variation, tv_bound
    from qalign.toy.model import ToyModel
    from qalign.toy.server import ToyServerOptions, serve_in_thread

    max_new = 3
    toy = ToyModel()
    gen_opts = ToyServerOptions(served_model_names=("toy-lm",), port=0)
    rm_opts = ToyServerOptions(served_model_names=("toy-rm",), port=0)
    with serve_in_thread(gen_opts) as gen_srv, serve_in_thread(rm_opts) as rm_srv:
        click.echo(f"toy generator at {gen_srv.url}, toy reward model at {rm_srv.url}")
        model = RemoteVLLM(gen_srv.url, "toy-lm", max_new_tokens=max_new, max_prompt_length=64)
        reward = RemoteReward(rm_srv.url, "toy-rm", server_format="vllm")
        chain = QAlign(model, reward, beta=beta, seed=seed)
        question = [{"role": "user", "content": "Should we ship it? Answer yes, no, maybe, so."}]
        out = chain.run([question] * chains, steps=steps, use_tqdm=True)
    finals = collections.Counter(tuple(recs[-1].state.tokens) for recs in out.records)
    target = toy.target(beta, max_new)
    empirical = {y: c / chains for y, c in finals.items()}
    tv = total_variation(empirical, target)
    accepted = sum(r.accepted for recs in out.records for r in recs[1:])
    top = [
        {"response": toy.decode(y), "empirical": empirical.get(y, 0.0), "target": p}
        for y, p in sorted(target.items(), key=lambda kv: -kv[1])[:8]
    ]
    summary = {
        "chains": chains,
        "steps": steps,
        "beta": beta,
        "acceptance_rate": accepted / max(1, chains * steps),
        "tv_to_exact_target": tv,
        "tv_expected_from_sampling_alone": tv_bound(target, chains),
        "top": top,
    }
    if json_out:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"\n{'response':<24} {'chains':>8} {'exact target':>13}")
    for row in top:
        click.echo(f"{row['response']:<24} {row['empirical']:>8.3f} {row['target']:>13.3f}")
    noise = tv_bound(target, chains)
    click.echo(
        f"\nacceptance rate {summary['acceptance_rate']:.2f}; total variation to the exact target "
        f"{tv:.3f} (sampling noise alone allows up to ~{noise:.3f} with {chains} chains, "
        f"plus what {steps} steps have not yet mixed)"
    )


if __name__ == "__main__":
    main()
