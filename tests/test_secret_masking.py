"""A server that echoes the request's Authorization header (or the API key) in its error bodies
cannot put the key into step errors, chains, `sweep status`, logs or exports.

The toy generator requires a key (`api_key`) and, with `echo_auth`, quotes the request's
Authorization header in every error answer, as some servers and proxies do. Before the client
layer masked its keys, the key went verbatim into `step_errors.message`, `chains.last_error`,
`qalign sweep status`, the run's log lines and `qalign export`.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from sqlalchemy import select

from benchmarks.chaos import PrivateRedis
from qalign.clients.errors import ClientError, ProtocolError, ServerRequestError
from qalign.clients.http import EndpointPool, HttpSettings
from qalign.clients.redact import MASK, redact
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import upgrade
from qalign.storage.models import Chain
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.stub_servers import serve_in_background
from tests.sweeps_support import Broker, Worker, cli, sweep_config, workers, write_config

COMPLETION = {"model": "toy-lm", "prompt": [1, 2, 3], "max_tokens": 2}


def _new_key() -> str:
    """A distinctive key per test: found anywhere only if it leaked."""
    return f"sk-qalign-{secrets.token_hex(20)}"


def _texts_of(exc: BaseException) -> Iterator[str]:
    """Every text a log or traceback could show for `exc`, its causes and contexts included."""
    yield "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield str(cur)
        yield repr(cur)
        yield str(getattr(cur, "message", ""))
        cur = cur.__cause__ or cur.__context__


def _assert_masked(exc: BaseException, key: str) -> None:
    for text in _texts_of(exc):
        assert key not in text and key[:12] not in text, text
    assert f"Bearer {MASK}" in str(exc), str(exc)  # the echo happened, and was masked


# ---- the whole path: qalign run, status, export ----------------------------------------------


def _dump_sqlite(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(
            repr(row) for t in tables for row in conn.execute(f'SELECT * FROM "{t}"').fetchall()
        )


def _parquet_text(folder: Path) -> str:
    tables = [pq.read_table(f).to_pylist() for f in sorted(folder.glob("*.parquet"))]
    return json.dumps(tables, default=str)


@pytest.mark.timeout(540)
def test_an_echoing_server_cannot_leak_the_key_anywhere(
    tmp_path: Path, toy: tuple[str, str]
) -> None:
    key = _new_key()
    key_file = tmp_path / "gen.key"
    key_file.write_text(f"  \t{key} \n")  # the stripped key is what is sent, and masked
    gen_options = ToyServerOptions(
        served_model_names=("toy-lm",), port=0, api_key=key, echo_auth=True, error_rate=1.0
    )
    db_file = tmp_path / "q.sqlite"
    db = f"sqlite:///{db_file}"
    with serve_in_thread(gen_options) as gen:
        cfg = sweep_config("masked", gen.url, toy[1], prompts=1, beta=1.0, steps=2, chains=2)
        cfg["generator"].update(api_key_file=str(key_file), max_retries=2)
        cfg["execution"] = {"max_attempts": 2}
        path = write_config(tmp_path, cfg)
        run = cli("run", str(path), "--database", db)
        served = gen.metrics()
    assert run.returncode != 0, run.stdout + run.stderr  # every chain failed
    # The key was accepted (no 401) and every generation was answered 503 with the echo.
    assert served["errors_by_status"]["401"] == 0
    assert served["errors_by_status"]["503"] >= 2 * 2  # chains x attempts
    status = cli("sweep", "status", "masked", "--database", db)
    status_json = cli("sweep", "status", "masked", "--database", db, "--json")
    export_dir = tmp_path / "export"
    export = cli("export", "masked", "-o", str(export_dir), "--format", "both", "--database", db)
    for done in (status, status_json, export):
        assert done.returncode == 0, done.stderr
    with sqlite3.connect(db_file) as conn:
        step_errors = [r[0] for r in conn.execute("SELECT error FROM step_errors")]
        last_errors = [r[0] for r in conn.execute("SELECT last_error FROM chains")]
    assert len(step_errors) == 2 * 2 and len(last_errors) == 2
    places = {
        "step_errors": "\n".join(step_errors),
        "chains.last_error": "\n".join(last_errors),
        "sweep status": status.stdout + status.stderr,
        "sweep status --json": status_json.stdout + status_json.stderr,
        "qalign run output": run.stdout + run.stderr,
        "exported JSONL": "\n".join(f.read_text() for f in sorted(export_dir.glob("*.jsonl"))),
        "exported Parquet": _parquet_text(export_dir),
        "Parquet bytes": "\n".join(
            f.read_bytes().decode("latin-1") for f in export_dir.glob("*.parquet")
        ),
        "database": _dump_sqlite(db_file),
    }
    for where, text in places.items():
        assert key not in text, f"the API key leaked into the {where}"
        assert key[:12] not in text, f"part of the API key leaked into the {where}"
    # The echo did happen, and is shown masked wherever the error is.
    marker = f"Authorization: Bearer {MASK}"
    for where in ("step_errors", "chains.last_error", "exported JSONL", "exported Parquet"):
        assert marker in places[where], (where, places[where][:2000])
    assert marker in " ".join(places["sweep status"].split())
    assert marker in json.dumps(json.loads(status_json.stdout))
    assert marker in places["qalign run output"]


@pytest.mark.timeout(540)
def test_a_worker_logs_and_records_the_echo_masked(
    pg_url: str, tmp_path: Path, toy: tuple[str, str]
) -> None:
    key = _new_key()
    key_env = {"QALIGN_TEST_MASKED_KEY": f" {key}\n"}  # the stripped key is sent, and masked
    gen_options = ToyServerOptions(
        served_model_names=("toy-lm",), port=0, api_key=key, echo_auth=True, error_rate=1.0
    )
    rd = PrivateRedis(log=tmp_path / "redis.log")
    rd.start()
    try:
        broker = Broker(rd.url)
        env = {**broker.env(), **key_env}
        with serve_in_thread(gen_options) as gen:
            upgrade(pg_url)
            cfg = sweep_config("masked", gen.url, toy[1], prompts=1, beta=1.0, steps=2, chains=2)
            cfg["generator"].update(api_key_env="QALIGN_TEST_MASKED_KEY", max_retries=2)
            cfg["execution"] = {"max_attempts": 2}
            path = write_config(tmp_path, cfg)
            created = cli("sweep", "create", str(path), "--database", pg_url, env=env)
            assert created.returncode == 0, created.stderr
            worker = Worker(
                "masked@host", pg_url, broker, 2, env=key_env, log_dir=tmp_path,
            )  # fmt: skip
            with workers(worker):
                assert cli("sweep", "run", "masked", "--database", pg_url, env=env).returncode == 0
                _wait_all_failed(pg_url, 2, worker)
                log = worker.output()
    finally:
        rd.kill()
    status = cli("sweep", "status", "masked", "--database", pg_url)
    status_json = cli("sweep", "status", "masked", "--database", pg_url, "--json")
    for where, text in {
        "worker log": log,
        "sweep status": status.stdout + status.stderr,
        "sweep status --json": status_json.stdout + status_json.stderr,
    }.items():
        assert key not in text and key[:12] not in text, f"the API key leaked into the {where}"
    assert f"Authorization: Bearer {MASK}" in log
    assert f"Authorization: Bearer {MASK}" in json.dumps(json.loads(status_json.stdout))


def _wait_all_failed(db_url: str, chains: int, worker: Worker, timeout: float = 300) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as s:
            failed = len(s.execute(select(Chain.id).where(Chain.status == "failed")).all())
        if failed == chains:
            return
        assert worker.proc.poll() is None, worker.output()[-4000:]
        assert time.monotonic() < deadline, f"{failed}/{chains} failed: {worker.output()[-4000:]}"
        time.sleep(0.2)


# ---- the client alone ------------------------------------------------------------------------


def _settings(key: str) -> HttpSettings:
    return HttpSettings(api_key=key, max_retries=2, backoff_initial=0.01, total_timeout=10)


async def test_the_client_masks_its_key_echoed_in_a_retried_error() -> None:
    key = _new_key()
    options = ToyServerOptions(port=0, api_key=key, echo_auth=True, error_rate=1.0)
    with serve_in_thread(options) as server:
        pool = EndpointPool(server.url, _settings(key))
        try:
            with pytest.raises(ClientError) as info:
                await pool.request("POST", "/v1/completions", COMPLETION, parse=dict)
        finally:
            await pool.close()
    assert "HTTP 503" in str(info.value)
    _assert_masked(info.value, key)


async def test_the_client_masks_a_wrong_key_echoed_in_a_401() -> None:
    sent = _new_key()
    options = ToyServerOptions(port=0, api_key=_new_key(), echo_auth=True)
    with serve_in_thread(options) as server:
        pool = EndpointPool(server.url, _settings(sent))
        try:
            with pytest.raises(ServerRequestError) as info:
                await pool.request("POST", "/v1/completions", COMPLETION, parse=dict)
        finally:
            await pool.close()
    assert info.value.status == 401
    _assert_masked(info.value, sent)
    assert sent not in info.value.message


def _echo_app() -> web.Application:
    """Answers that quote the Authorization header in every way a client turns into text."""

    async def handle(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        padding = "x" * 150  # puts the key across the 200-character excerpt of a bad body
        bodies: dict[str, tuple[int, str]] = {
            "/not-json": (200, f"<html>{padding} denied for {auth} </html>"),
            "/wrong-shape": (200, json.dumps({"detail": {"token": key}})),
            "/not-a-number": (200, json.dumps({"count": key})),
            "/text-503": (503, f"upstream rejected {auth}"),
            # the key across the 2000-character cut of an error message
            "/long-400": (400, json.dumps({"error": {"message": "y" * 1970 + auth}})),
        }
        status, text = bodies[request.path]
        return web.Response(status=status, text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _choices(data: Any) -> Any:
    if not isinstance(data, dict) or "choices" not in data:
        raise ProtocolError(f"completion answer has no choices: {data!r:.300}")
    return data["choices"]


def _count(data: Any) -> int:
    return int(data["count"])  # ValueError quoting the answer: a traceback shows the cause


@pytest.mark.parametrize(
    ("path", "parse", "expected"),
    [
        ("/not-json", dict, "not valid JSON"),
        ("/wrong-shape", _choices, "no choices"),
        ("/not-a-number", _count, "unexpected response shape"),
        ("/text-503", dict, "HTTP 503"),
        ("/long-400", dict, "HTTP 400"),
    ],
)
async def test_every_error_the_client_builds_from_an_answer_masks_the_key(
    path: str, parse: Any, expected: str
) -> None:
    key = _new_key()
    with serve_in_background(_echo_app()) as url:
        pool = EndpointPool(url, _settings(key))
        try:
            with pytest.raises(ClientError) as info:
                await pool.request("POST", path, {}, parse=parse)
        finally:
            await pool.close()
    assert expected in str(info.value)
    for text in _texts_of(info.value):
        assert key not in text and key[:12] not in text and key[-12:] not in text, text
    assert MASK in str(info.value)


# ---- redact ----------------------------------------------------------------------------------


def test_redact_masks_every_form_of_a_key() -> None:
    key = "sk-live/abc+def=ghijklmnop"
    assert redact(f"Authorization: Bearer {key}", [key]) == "Authorization: Bearer ***"
    assert redact(f"echo '{key}'", [f"  {key}\n"]) == "echo '***'"  # the file's whitespace
    assert redact(json.dumps({"auth": key}), [key]) == '{"auth": "***"}'
    assert redact("q=sk-live%2Fabc%2Bdef%3Dghijklmnop&x=1", [key]) == "q=***&x=1"
    assert redact(f"cut here: {key[:14]}", [key]) == "cut here: ***"  # an excerpt's end
    assert redact(f"{key[-10:]} was the end", [key]) == "*** was the end"
    assert redact(f"{key}{key} and {key}", [key, None, ""]) == "*** and ***"
    assert redact("sk-live is a prefix, short", [key]) == "sk-live is a prefix, short"
    assert redact("nothing here", [None, "", "   "]) == "nothing here"
    assert redact("a=K1 b=K2", ["K1", "K2"]) == "a=*** b=***"
