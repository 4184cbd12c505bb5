"""Security: JSON-only Celery, API keys that never leak, redacted URLs, a loopback-only toy
server, and SQL built from bound parameters only."""

from __future__ import annotations

import ast
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ContentDisallowed
from sqlalchemy import MetaData, create_engine, inspect, make_url, select

from qalign.cli import main
from qalign.clients.credentials import api_key as _api_key
from qalign.clients.errors import CredentialsError
from qalign.clients.http import HttpSettings
from qalign.config import ConfigError, parse_config
from qalign.dispatch.base import STEP_TASK
from qalign.dispatch.celery import BrokerSettings, celery_app
from qalign.scheduler.sweeps import create_sweep
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import ensure_schema
from qalign.storage.models import Chain, Proposal
from qalign.toy.server import ToyServerOptions, serve_in_thread
from tests.sources import parse_source
from tests.stub_servers import proxy_app, serve_in_background
from tests.sweeps_support import ROOT, Broker, Worker, sweep_config, wait_done, workers

GEN_KEY = "gen-KEY-7f3a9c1e55d2"
RM_KEY = "rm-KEY-0b8e42d6aa19"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


# ---- Celery accepts JSON only ---------------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle was (or was not) deserialized."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_app_accepts_only_json() -> None:
    conf = celery_app(BrokerSettings()).conf
    assert list(conf.accept_content) == ["json"] and conf.task_serializer == "json"


def test_pickled_message_is_refused_when_decoded_with_the_apps_accept_list(
    tmp_path: Path, broker: Broker
) -> None:
    app = celery_app(BrokerSettings(url=broker.url, queue=broker.queue))
    marker = tmp_path / "unpickled"
    queue = Queue(broker.queue, Exchange(broker.queue), routing_key=broker.queue)
    try:
        with Connection(broker.url) as conn:
            Producer(conn).publish(
                [[_Payload(marker), 0], {}, {}],
                serializer="pickle",
                exchange=queue.exchange,
                routing_key=broker.queue,
                declare=[queue],
                headers={"task": STEP_TASK, "id": str(uuid.uuid4())},
            )
            received: list[Any] = []
            with Consumer(
                conn, [queue], accept=app.conf.accept_content, on_message=received.append
            ):
                conn.drain_events(timeout=5)
            (message,) = received
            assert message.content_type == "application/x-python-serialize"
            with pytest.raises(ContentDisallowed, match="pickle"):
                message.decode()
            message.ack()
    finally:
        broker.flush()
    assert not marker.exists()


def test_worker_refuses_a_pickled_step_and_runs_a_json_one(
    pg_url: str, tmp_path: Path, toy: tuple[str, str], broker: Broker
) -> None:
    # Trust authentication ignores the password, so it only tests that logs never show it.
    db_url = make_url(pg_url).set(password="W0rkerDbPW").render_as_string(hide_password=False)
    ensure_schema(db_url)
    sessions = make_sessionmaker(make_engine(db_url))
    cfg = parse_config(sweep_config("pickle", *toy, prompts=1, beta=1.0, steps=1, chains=1))
    create_sweep(sessions, cfg, check=False)
    with sessions() as s:
        chain_id = s.execute(select(Chain.id)).scalar_one()
    app = celery_app(BrokerSettings(url=broker.url, queue=broker.queue))
    marker = tmp_path / "unpickled"
    try:
        worker = Worker("qalign-pickle", db_url, broker, concurrency=2, log_dir=tmp_path)
        with workers(worker):
            app.send_task(STEP_TASK, args=[_Payload(marker), 0], serializer="pickle")
            # Wide: a loaded machine may take minutes to start a worker (still < pytest's 600 s).
            deadline = time.monotonic() + 300
            while "Refusing to deserialize untrusted content" not in worker.output():
                assert time.monotonic() < deadline, worker.output()
                assert worker.proc.poll() is None, worker.output()
                time.sleep(0.2)
            assert "pickle" in worker.output()
            assert not marker.exists()
            with sessions() as s:
                assert s.execute(select(Proposal.id)).first() is None
            # The same worker executes a JSON message for the same step.
            app.send_task(STEP_TASK, args=[chain_id, 0])
            wait_done(db_url, 1, timeout=240)
            log = worker.output()
    finally:
        broker.flush()
    assert not marker.exists()
    assert "W0rkerDbPW" not in log


# ---- API keys -------------------------------------------------------------------------------


def _dump_database(url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    parts: list[str] = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            parts.extend(repr(tuple(row)) for row in conn.execute(select(table)))
    engine.dispose()
    return "\n".join(parts)


def _files_text(*paths: Path) -> str:
    out = []
    for p in paths:
        for f in [p] if p.is_file() else sorted(p.rglob("*")):
            if f.is_file():
                out.append(f.read_bytes().decode("latin-1"))
    return "\n".join(out)


def test_api_keys_are_sent_as_bearer_and_never_stored_logged_or_printed(
    sqlite_url: str,
    tmp_path: Path,
    toy: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    key_file = tmp_path / "gen.key"
    key_file.write_text(f"  {GEN_KEY}\n")
    monkeypatch.setenv("QALIGN_TEST_RM_KEY", RM_KEY)
    gen_seen: list[str] = []
    rm_seen: list[str] = []
    with (
        serve_in_background(proxy_app(toy[0], require_key=GEN_KEY, seen_auth=gen_seen)) as gen,
        serve_in_background(proxy_app(toy[1], require_key=RM_KEY, seen_auth=rm_seen)) as rm,
    ):
        cfg = sweep_config("keys", gen, rm, prompts=2, beta=1.0, steps=2, chains=2)
        cfg["generator"]["api_key_file"] = str(key_file)
        cfg["reward"]["api_key_env"] = "QALIGN_TEST_RM_KEY"
        path = tmp_path / "keys.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = invoke("run", str(path), "--database", sqlite_url, "--quiet")  # checks servers too
        assert run.exit_code == 0, run.output
    assert gen_seen and set(gen_seen) == {f"Bearer {GEN_KEY}"}
    assert rm_seen and set(rm_seen) == {f"Bearer {RM_KEY}"}

    outputs = [run.output]
    for args in (
        ["sweep", "status", "keys"],
        ["sweep", "status", "keys", "--json"],
        ["sweep", "show", "keys"],
        ["sweep", "list", "--json"],
        ["export", "keys", "-o", str(tmp_path / "export"), "--format", "both"],
    ):
        result = invoke(*args, "--database", sqlite_url)
        assert result.exit_code == 0, (args, result.output)
        outputs.append(result.output)
    shown = outputs[3]
    assert "api_key_file" in shown and str(key_file) in shown  # where, not what
    db_file = Path(make_url(sqlite_url).database or "")
    everything = {
        "cli output": "\n".join(outputs),
        "logs": caplog.text,
        "database rows": _dump_database(sqlite_url),
        "database files": _files_text(*db_file.parent.glob(db_file.name + "*")),
        "exports": _files_text(tmp_path / "export"),
    }
    assert everything["exports"] and everything["database rows"]
    for where, content in everything.items():
        for key in (GEN_KEY, RM_KEY):
            assert key not in content, f"the API key leaked into the {where}"


def test_a_wrong_key_is_a_recorded_401_without_the_key(
    sqlite_url: str, tmp_path: Path, toy: tuple[str, str]
) -> None:
    key_file = tmp_path / "wrong.key"
    key_file.write_text("not-the-right-key-123")
    with serve_in_background(proxy_app(toy[0], require_key=GEN_KEY)) as gen:
        cfg = sweep_config("wrong", gen, toy[1], prompts=1, beta=1.0, steps=1, chains=1)
        cfg["generator"]["api_key_file"] = str(key_file)
        path = tmp_path / "wrong.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = invoke("run", str(path), "--database", sqlite_url, "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "HTTP 401" in result.output and "not-the-right-key-123" not in result.output


def api_key(section: dict[str, Any]) -> str | None:
    return _api_key(section.get("api_key_env"), section.get("api_key_file"))


def test_missing_key_sources_are_named_not_guessed(tmp_path: Path) -> None:
    base = {"timeout": 1.0, "max_retries": 1}
    with pytest.raises(CredentialsError, match=r"\$QALIGN_NO_SUCH_VAR_X, which is not set"):
        api_key({**base, "api_key_env": "QALIGN_NO_SUCH_VAR_X"})
    missing = tmp_path / "absent.key"
    with pytest.raises(CredentialsError, match=r"cannot read api_key_file .*absent\.key"):
        api_key({**base, "api_key_file": str(missing)})
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(CredentialsError, match="is empty"):
        api_key({**base, "api_key_file": str(empty)})
    two_lines = tmp_path / "two.key"
    two_lines.write_text("first-key\nsecond-key\n")
    with pytest.raises(CredentialsError, match="whitespace or a control character"):
        api_key({**base, "api_key_file": str(two_lines)})
    padded = tmp_path / "padded.key"
    padded.write_text("  the-key \n")
    assert api_key({**base, "api_key_file": str(padded)}) == "the-key"
    assert api_key(base) is None


def test_key_sources_stay_out_of_the_fingerprint_and_settings_repr(tmp_path: Path) -> None:
    cfg = sweep_config("fp", "http://h:1", "http://h:2")
    plain = parse_config(cfg).fingerprint()
    for section, extra in (
        ("generator", {"api_key_file": str(tmp_path / "a.key")}),
        ("generator", {"api_key_env": "SOME_KEY"}),
        ("reward", {"api_key_env": "OTHER_KEY"}),
        ("generator", {"vocab_size": 1000}),
    ):
        changed = {**cfg, section: {**cfg[section], **extra}}
        assert parse_config(changed).fingerprint() == plain
    assert GEN_KEY not in repr(HttpSettings(api_key=GEN_KEY))
    assert HttpSettings(api_key=GEN_KEY).headers() == {"Authorization": f"Bearer {GEN_KEY}"}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"api_key_env": "A", "api_key_file": "/k"}, "not both"),
        ({"api_key_env": "sk-live 123"}, "must name an environment variable"),
        ({"urls": ["http://user:UrlPW@h:1"]}, "must not carry user:password@"),
    ],
)
def test_secret_shaped_config_mistakes_are_refused(extra: dict[str, Any], needle: str) -> None:
    cfg = sweep_config("bad", "http://h:1", "http://h:2")
    cfg["generator"] = {**cfg["generator"], **extra}
    with pytest.raises(ConfigError, match=needle) as err:
        parse_config(cfg)
    assert "UrlPW" not in str(err.value)


# ---- redaction of URLs with passwords -------------------------------------------------------


def test_unreachable_broker_is_one_redacted_line(sqlite_url: str) -> None:
    ensure_schema(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    create_sweep(
        sessions, parse_config(sweep_config("brk", "http://h:1", "http://h:2")), check=False
    )
    result = invoke(
        "sweep",
        "run",
        "brk",
        "--database",
        sqlite_url,
        "--broker",
        "redis://:BrokerPW@127.0.0.1:1/0",
    )
    out = result.output
    assert result.exit_code == 1 and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1 and "BrokerPW" not in out
    assert "cannot reach the Celery broker redis://:***@127.0.0.1:1/0" in out


def test_database_passwords_are_redacted_in_cli_output(pg_url: str) -> None:
    url = make_url(pg_url).set(password="DbPW_9q").render_as_string(hide_password=False)
    upgraded = invoke("db", "upgrade", "--database", url)
    checked = invoke("db", "check", "--database", url)
    refused = invoke("sweep", "list", "--database", url.replace("5432", "1"))
    for result in (upgraded, checked, refused):
        assert "DbPW_9q" not in result.output and "***" in result.output
    assert upgraded.exit_code == 0 and checked.exit_code == 0 and refused.exit_code == 1


# ---- the toy server listens on loopback only ------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_toy_server_binds_loopback_by_default() -> None:
    from qalign.toy.cli import toy_server_command

    assert ToyServerOptions().host == "127.0.0.1"
    defaults = {p.name: p.default for p in toy_server_command.params}
    assert defaults["host"] == "127.0.0.1"
    with serve_in_thread(ToyServerOptions(port=0)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        assert _listening_addresses(port) == {"127.0.0.1"}


# ---- SQL through bound parameters -----------------------------------------------------------

_SQL_CALLS = {"text", "exec_driver_sql", "execute", "executescript", "executemany"}


def _built_strings(tree: ast.AST) -> list[str]:
    """Calls that pass SQL built at run time (f-string, %, +, .format) as their statement."""
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        arg = node.args[0]
        built = isinstance(arg, ast.JoinedStr) or (
            isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod | ast.Add)
        )
        built |= (
            isinstance(arg, ast.Call)
            and isinstance(arg.func, ast.Attribute)
            and arg.func.attr == "format"
        )
        if name in _SQL_CALLS and built:
            bad.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
    return bad


def test_no_sql_is_built_from_strings_in_product_code() -> None:
    offenders = {}
    for path in sorted([*(ROOT / "qalign").rglob("*.py"), *(ROOT / "migrations").rglob("*.py")]):
        bad = _built_strings(parse_source(path))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, offenders


INJECTIONS = ["x'; DROP TABLE chains; --", "' OR '1'='1", "1; UPDATE chains SET status='done'", "%"]


def test_cli_filters_are_plain_strings(db_url: str, tmp_path: Path) -> None:
    ensure_schema(db_url)
    sessions = make_sessionmaker(make_engine(db_url))
    cfg = parse_config(sweep_config("real", "http://h:1", "http://h:2"))
    create_sweep(sessions, cfg, check=False)
    for name in INJECTIONS:
        for args in (
            ["sweep", "status", name],
            ["sweep", "show", name],
            ["sweep", "cancel", name],
            ["sweep", "run", name, "--broker", "redis://127.0.0.1:1/0"],
            ["export", name, "-o", str(tmp_path / "x")],
            ["predict", name, "--method", "mv"],
        ):
            result = invoke(*args, "--database", db_url)
            assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
            assert "no sweep" in result.output and "real" in result.output, result.output
    engine = make_engine(db_url)
    assert {"chains", "sweeps", "proposals"} <= set(inspect(engine).get_table_names())
    with make_sessionmaker(engine)() as s:
        statuses = s.execute(select(Chain.status)).scalars().all()
    engine.dispose()
    assert len(statuses) == 32 and set(statuses) == {"pending"}
    listed = json.loads(invoke("sweep", "list", "--json", "--database", db_url).output)
    assert [r["name"] for r in listed] == ["real"] and listed[0]["status"] == "active"
