"""`qalign toy-server`: run the toy vLLM / SGLang imitation server in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from qalign.toy.server import LOGPROBS_MODES, ToyServer, ToyServerOptions


async def _serve_forever(options: ToyServerOptions) -> None:
    server = ToyServer(options)
    await server.start()
    names = ", ".join(options.served_model_names)
    click.echo(f"qalign toy server listening on {server.url} (models: {names})", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


@click.command("toy-server")
@click.option(
    "--served-model-name",
    "served_model_names",
    multiple=True,
    default=("toy",),
    show_default=True,
    help="Model name to serve (repeatable); requests naming another model get 404.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-model-len", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--latency-base",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds every sequence takes before answering.",
)
@click.option(
    "--latency-per-token",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Extra seconds per generated token.",
)
@click.option(
    "--capacity",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Concurrent sequences (0 = unlimited); more wait for a free slot.",
)
@click.option(
    "--error-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of generate/classify requests answered 503.",
)
@click.option(
    "--hang-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of generate/classify requests that sleep --hang-seconds first.",
)
@click.option("--hang-seconds", default=3600.0, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--malformed-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of generate/classify answers whose JSON body is cut short.",
)
@click.option(
    "--nan-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of classify/pooling answers whose scores are NaN.",
)
@click.option("--fault-seed", default=None, type=int, help="Seed of the fault injection draws.")
@click.option(
    "--legacy-token-ids",
    is_flag=True,
    help="Act as vLLM < 0.10.2: ignore return_token_ids (ids only via logprobs).",
)
@click.option(
    "--ignore-use-activation",
    is_flag=True,
    help="Act as old vLLM: /classify always applies the sigmoid.",
)
@click.option(
    "--logprobs-mode",
    type=click.Choice(LOGPROBS_MODES),
    default="processed_logprobs",
    show_default=True,
    help="Report logprobs of the temperature-scaled (processed) or temperature-1 (raw) LM.",
)
@click.option("--max-logprobs", default=20, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--echo-auth",
    is_flag=True,
    help="Quote the request's Authorization header in every error answer (tests of masking).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, exists=True),
    help="Require `Authorization: Bearer <key>`, the key being this file's stripped content.",
)
def toy_server_command(**kwargs: object) -> None:
    """Serve the toy LM + reward over the vLLM and SGLang HTTP protocols."""
    kwargs["served_model_names"] = tuple(kwargs["served_model_names"] or ("toy",))  # type: ignore[arg-type]
    key_file = kwargs.pop("api_key_file")
    if key_file is not None:  # a file, not a flag: a flag's value is visible to `ps`
        kwargs["api_key"] = Path(str(key_file)).read_text(encoding="utf-8").strip() or None
    try:
        options = ToyServerOptions(**kwargs)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(options))
