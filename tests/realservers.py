"""Helpers for tests that run against REAL inference servers (no pytest tests in here).

The servers are installed by ``scripts/real-servers/setup.sh`` into a cache outside the repo
(``$QALIGN_REALSRV_HOME``, default ``~/.cache/qalign/realsrv``) and started / stopped by
``start.sh`` / ``stop.sh`` next to it.

Typical use (start once per session; a vLLM start costs ~1 min)::

    from tests.realservers import require_or_skip, vllm_servers

    @pytest.fixture(scope="session")
    def real_vllm():
        require_or_skip("vllm")
        with vllm_servers() as urls:
            yield urls            # urls.gen == "http://127.0.0.1:8000", urls.rm == "http://127.0.0.1:8001"

Served model names: generator ``meta-llama/Llama-3.1-8B-Instruct`` and ``smollm2``; reward model
``Skywork/Skywork-Reward-Llama-3.1-8B-v0.2`` and ``smollm2-rm``; llama.cpp alias ``smollm2``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "real-servers"
HOST = "127.0.0.1"

GEN_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
GEN_MODEL_ALIAS = "smollm2"
RM_MODEL = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
RM_MODEL_ALIAS = "smollm2-rm"
LLAMACPP_MODEL = "smollm2"

# Cache markers written by setup.sh after each stage succeeded.
_MARKERS = {
    "vllm": ("venv-vllm", "model-gen", "model-rm"),
    "llamacpp": ("venv-xl",),
}
_MODES = ("vllm", "llamacpp", "all")

# start.sh waits up to QALIGN_START_TIMEOUT itself (its default is 600 s, more than a whole test
# may take under pytest's 600 s timeout, which also covers fixture setup): tests ask for 420 s,
# and this backstop sits above that but below pytest's limit.
_START_WAIT_S = 420
_START_TIMEOUT_S = 500
_STOP_TIMEOUT_S = 120


class VllmUrls(NamedTuple):
    gen: str
    rm: str


def realsrv_home() -> Path:
    """Cache folder of the real-server install (venvs, models, run/ with pids and logs)."""
    env = os.environ.get("QALIGN_REALSRV_HOME")
    return Path(env) if env else Path.home() / ".cache" / "qalign" / "realsrv"


def _modes(mode: str) -> tuple[str, ...]:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return ("vllm", "llamacpp") if mode == "all" else (mode,)


def is_installed(mode: str) -> bool:
    """True if setup.sh MODE completed (all its cache markers are present)."""
    markers = realsrv_home() / "markers"
    return all((markers / f"{name}.ok").is_file() for m in _modes(mode) for name in _MARKERS[m])


def require_or_skip(mode: str) -> None:
    """Skip the calling test if the real servers for MODE are not installed.

    With QALIGN_REQUIRE_REAL_SERVERS=1 (set by CI) a missing install is a test failure instead,
    so nothing is skipped silently.
    """
    import pytest

    if is_installed(mode):
        return
    msg = (
        f"real {mode} servers not installed in {realsrv_home()}: "
        f"run `bash scripts/real-servers/setup.sh {mode}`"
    )
    if os.environ.get("QALIGN_REQUIRE_REAL_SERVERS") == "1":
        pytest.fail(msg + " (QALIGN_REQUIRE_REAL_SERVERS=1 forbids skipping)", pytrace=False)
    pytest.skip(msg)


def _run(script: str, mode: str, env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPTS / script), mode],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {mode} failed (exit {proc.returncode}):\n{proc.stdout}")


@contextmanager
def _servers(mode: str, env: dict[str, str]) -> Iterator[None]:
    try:
        wait = {"QALIGN_START_TIMEOUT": os.environ.get("QALIGN_START_TIMEOUT", str(_START_WAIT_S))}
        _run("start.sh", mode, {**wait, **env}, _START_TIMEOUT_S)
        yield
    finally:
        # Always stop, also after a failed or timed-out start (stop.sh is idempotent).
        _run("stop.sh", mode, env, _STOP_TIMEOUT_S)


@contextmanager
def vllm_servers(gen_port: int = 8000, rm_port: int = 8001) -> Iterator[VllmUrls]:
    """Run the real vLLM generator and reward-model servers; yield their base URLs."""
    env = {"QALIGN_GEN_PORT": str(gen_port), "QALIGN_RM_PORT": str(rm_port)}
    with _servers("vllm", env):
        yield VllmUrls(gen=f"http://{HOST}:{gen_port}", rm=f"http://{HOST}:{rm_port}")


@contextmanager
def llamacpp_server(port: int = 8081) -> Iterator[str]:
    """Run the real llama.cpp server (xllamacpp, SmolLM2, 4 slots); yield its base URL."""
    with _servers("llamacpp", {"QALIGN_LLAMACPP_PORT": str(port)}):
        yield f"http://{HOST}:{port}"


def run_async(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion, closing the shared aiohttp sessions afterwards."""
    import asyncio

    from qalign.clients import close_sessions

    async def wrapped():  # type: ignore[no-untyped-def]
        try:
            return await coro
        finally:
            await close_sessions()

    return asyncio.run(wrapped())
