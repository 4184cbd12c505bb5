"""Bad input gives a clear error, never a traceback: fuzzed configs, over-long prompts, malformed
server answers, and empty, newer-schema or wrongly named databases."""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text

from qalign.cli import main
from qalign.clients import close_sessions
from qalign.clients.base import SamplingParams
from qalign.clients.errors import ProtocolError
from qalign.clients.http import HttpSettings
from qalign.clients.llamacpp import LlamaCppGenerator
from qalign.clients.sglang import SGLangGenerator
from qalign.clients.vllm import VLLMGenerator, VLLMReward
from qalign.config import ConfigError, parse_config
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import ensure_schema
from qalign.storage.models import Chain, Prompt, Proposal
from tests.stub_servers import proxy_app, serve_in_background
from tests.sweeps_support import sweep_config

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def assert_clean_failure(result: Result) -> str:
    """Exit code 1 with a one-message error: no traceback, no escaped exception."""
    out = result.output
    assert result.exit_code != 0, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in out, out
    assert "Error: " in out, out
    return out


# ---- configs -------------------------------------------------------------------------------

# Module-level (hypothesis examples cannot use function-scoped tmp_path); removed at exit.
_WORK = Path(tempfile.mkdtemp(prefix="qalign-fuzz-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)
_DB = f"sqlite:///{_WORK / 'fuzz.sqlite'}"
ensure_schema(_DB)

BASE = sweep_config("fuzz", "http://127.0.0.1:9", "http://127.0.0.1:9", prompts=2)
BASE["execution"] = {"concurrency": 4, "max_attempts": 2, "stall_timeout": 60.0}

PATHS = [
    "name",
    "method",
    "generator",
    "generator.backend",
    "generator.urls",
    "generator.model",
    "generator.timeout",
    "generator.max_retries",
    "generator.api_key_env",
    "generator.api_key_file",
    "generator.vocab_size",
    "reward",
    "reward.format",
    "reward.urls",
    "reward.model",
    "reward.batch_size",
    "dataset",
    "dataset.prompts",
    "dataset.limit",
    "dataset.task",
    "dataset.path",
    "dataset.shuffle_seed",
    "beta",
    "temperature",
    "steps",
    "chains_per_prompt",
    "seed",
    "index",
    "clamp",
    "max_new_tokens",
    "max_prompt_length",
    "execution",
    "execution.concurrency",
    "execution.max_attempts",
    "execution.stall_timeout",
]
REQUIRED = {"name", "generator", "generator.urls", "generator.model", "dataset"}
REQUIRED |= {"reward", "reward.urls", "reward.model", "dataset.prompts"}  # for this base

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
    st.lists(st.one_of(st.integers(), _text, st.none()), max_size=3),
    st.dictionaries(_text, st.integers(), max_size=2),
)


def _set(cfg: dict[str, Any], path: str, value: Any, *, delete: bool = False) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    if delete:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return out


def _create(cfg_text: str | bytes) -> Result:
    path = Path(tempfile.mkstemp(suffix=".yaml", dir=_WORK)[1])
    path.write_bytes(cfg_text.encode() if isinstance(cfg_text, str) else cfg_text)
    return invoke("sweep", "create", str(path), "--no-check", "--database", _DB)


def _valid(cfg: Any) -> bool:
    try:
        parse_config(cfg)
    except ConfigError:
        return False
    return True


def _check(cfg: dict[str, Any], path: str) -> None:
    """Invalid: a clean error naming every part of the key's path (section and key)."""
    result = _create(yaml.safe_dump(cfg, allow_unicode=True))
    if _valid(cfg):
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output
        return
    out = assert_clean_failure(result)
    assert "is invalid" in out
    assert all(part in out for part in path.split(".")), (path, out)


def test_base_config_is_valid() -> None:
    assert _valid(BASE)


@FUZZ
@given(path=st.sampled_from(PATHS), value=GARBAGE)
def test_fuzzed_values_name_the_key(path: str, value: Any) -> None:
    _check(_set(BASE, path, value), path)


@FUZZ
@given(path=st.sampled_from(PATHS))
def test_missing_keys_name_the_key(path: str) -> None:
    cfg = _set(BASE, path, None, delete=True)
    assert _valid(cfg) == (path not in REQUIRED)
    _check(cfg, path)


@FUZZ
@given(
    section=st.sampled_from(["", "generator", "reward", "dataset", "execution"]),
    key=st.from_regex(r"\A[a-z][a-z_]{0,10}\Z"),
)
def test_unknown_keys_are_named(section: str, key: str) -> None:
    known = set(BASE) | set(BASE[section] if section else {}) | {"execution", "api_key_file"}
    known |= {"api_key_env", "vocab_size", "options", "subset", "split", "limit", "task", "path"}
    known |= {"shuffle_seed", "prompt_field", "answer_field", "system_prompt", "backend"}
    known |= {"method", "index", "clamp", "batch_size", "format", "concurrency", "max_attempts"}
    known |= {"stall_timeout", "temperature", "steps"}
    if key in known:
        return
    cfg = _set(BASE, f"{section}.{key}" if section else key, 1)
    out = assert_clean_failure(_create(yaml.safe_dump(cfg)))
    assert (f"{section}.{key}" if section else key) in out
    assert "unknown key" in out


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), _text.map(lambda t: t.encode())))
def test_garbage_files_fail_cleanly(raw: bytes) -> None:
    result = _create(raw)
    out = assert_clean_failure(result)
    assert ".yaml" in out  # the message names the file


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("name: x\nseed: 2001-13-45\n", "cannot construct"),  # impossible date
        ("[" * 3000, "nested too deeply"),
        ("seed: !!timestamp 99\n", "cannot construct"),
        (b"\xff\xfe\x00name: x", "not UTF-8"),
        ("- a\n- b\n", "must be a mapping"),
        ("name: [unclosed", "not valid YAML"),
        ("{1: 2, name: x}", "1: Keys should be strings"),
    ],
)
def test_yaml_edge_cases_fail_cleanly(content: str | bytes, needle: str) -> None:
    out = assert_clean_failure(_create(content))
    assert needle in out


def test_secret_pasted_in_config_is_not_echoed() -> None:
    cfg = _set(BASE, "generator.api_key", "sk-pasted-secret-123")
    out = assert_clean_failure(_create(yaml.safe_dump(cfg)))
    assert "generator.api_key" in out and "api_key_env" in out
    assert "sk-pasted-secret-123" not in out


# ---- prompts longer than max_prompt_length ---------------------------------------------------


def test_too_long_prompt_fails_its_chains_with_a_recorded_reason(
    sqlite_url: str, tmp_path: Path, toy: tuple[str, str]
) -> None:
    cfg = sweep_config("long", *toy, prompts=2, beta=1.0, steps=2, chains=2)
    cfg["dataset"]["prompts"].append("yes no maybe so " * 100)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = invoke("run", str(path), "--database", sqlite_url, "--quiet", "--no-check")
    out = assert_clean_failure(result)
    assert "2 chain(s) failed" in out
    sessions = make_sessionmaker(make_engine(sqlite_url))
    with sessions() as s:
        rows = s.execute(
            select(Prompt.prompt_index, Chain.id, Chain.status, Chain.attempts, Chain.last_error)
            .join(Prompt, Prompt.id == Chain.prompt_id)
            .order_by(Chain.id)
        ).all()
        long_chains = [r for r in rows if r.prompt_index == 2]
        proposals = s.execute(
            select(Proposal.chain_id).where(Proposal.chain_id.in_([r.id for r in long_chains]))
        ).all()
    assert len(long_chains) == 2 and not proposals  # rejected, not truncated
    for r in long_chains:
        assert (r.status, r.attempts) == ("failed", 1)  # no retries: it cannot succeed
        assert "over max_prompt_length=64" in r.last_error and r.last_error.startswith("step 0:")
    assert all(r.status == "done" for r in rows if r.prompt_index != 2)

    status = invoke("sweep", "status", "long", "--database", sqlite_url)
    assert status.exit_code == 0, status.output
    failed = [line for line in status.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "2 chain(s)" in failed[0] and "max_prompt_length=64" in failed[0]
    as_json = invoke("sweep", "status", "long", "--database", sqlite_url, "--json")
    (run,) = json.loads(as_json.output)
    assert run["chains_failed"] == 2 and run["failures"][0]["chains"] == 2
    assert "max_prompt_length=64" in run["failures"][0]["reason"]


# ---- malformed server answers: the clients --------------------------------------------------

FAST = HttpSettings(max_retries=1, malformed_retries=0, backoff_initial=0.01)
GOOD_COMPLETION = {"choices": [{"token_ids": [5, 6], "finish_reason": "length"}]}


@pytest.fixture(autouse=True)
async def _close_client_sessions() -> AsyncIterator[None]:
    yield
    await close_sessions()


async def _stub(routes: dict[str, Any]) -> TestServer:
    """Serve fixed JSON answers (a str is sent verbatim) on 127.0.0.1."""
    app = web.Application()
    for key, answer in routes.items():
        method, path = key.split(" ", 1)

        async def handler(_req: web.Request, answer: Any = answer) -> web.Response:
            if isinstance(answer, str):
                return web.Response(text=answer, content_type="application/json")
            return web.json_response(answer)

        app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    return server


def _with(choice: dict[str, Any]) -> dict[str, Any]:
    return {"choices": [{**GOOD_COMPLETION["choices"][0], **choice}]}


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ("not json at all", "not valid JSON"),
        ([], "completion answer is not an object"),
        ({}, "no choices"),
        ({"choices": []}, "no choices"),
        ({"choices": "abc"}, "no choices"),
        ({"choices": [7]}, "choices[0] is not an object"),
        ({"choices": [{"finish_reason": "length"}]}, "choices[0].token_ids is missing"),
        (_with({"token_ids": "5 6"}), "choices[0].token_ids is not a list"),
        (_with({"token_ids": [5, "6"]}), "choices[0].token_ids contains a non token id: '6'"),
        (_with({"token_ids": [5, -1]}), "choices[0].token_ids contains a non token id: -1"),
        (_with({"token_ids": [5, 6.0]}), "choices[0].token_ids contains a non token id: 6.0"),
        (_with({"token_ids": [5, True]}), "choices[0].token_ids contains a non token id: True"),
        (_with({"token_ids": [5, 1000]}), "choices[0].token_ids contains token id 1000, outside"),
        (_with({"finish_reason": None}), "finish_reason None"),
        (_with({"finish_reason": 3}), "finish_reason 3"),
    ],
)
async def test_vllm_generator_rejects_malformed_completions(answer: Any, field: str) -> None:
    server = await _stub({"POST /v1/completions": answer})
    url = str(server.make_url("")).rstrip("/")
    gen = VLLMGenerator(url, "m", settings=FAST, token_ids_mode="token_ids", vocab_size=1000)
    try:
        with pytest.raises(ProtocolError) as err:
            await gen.generate([1, 2], max_tokens=4, seed=0, params=SamplingParams())
    finally:
        await gen.close()
        await server.close()
    assert url in str(err.value) and field in str(err.value)


async def test_vllm_generator_accepts_ids_inside_the_vocabulary() -> None:
    server = await _stub({"POST /v1/completions": _with({"token_ids": [5, 999]})})
    url = str(server.make_url("")).rstrip("/")
    gen = VLLMGenerator(url, "m", settings=FAST, token_ids_mode="token_ids", vocab_size=1000)
    try:
        out = await gen.generate([1], max_tokens=4, seed=0, params=SamplingParams())
    finally:
        await gen.close()
        await server.close()
    assert out.token_ids == (5, 999)


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({}, "expected 1 results in 'data', got None"),
        ({"data": [{"probs": [1.0]}, {"probs": [2.0]}]}, "expected 1 results in 'data'"),
        ({"data": [{}]}, "data[0].probs is not a number"),
        ({"data": [{"probs": "high"}]}, "data[0].probs is not a number"),
        ({"data": [{"probs": []}]}, "data[0].probs is empty"),
        ({"data": [{"index": 4, "probs": [1.0]}]}, "bad or repeated result index 4"),
    ],
)
async def test_vllm_reward_rejects_malformed_scores(answer: Any, field: str) -> None:
    server = await _stub(
        {"POST /tokenize": {"tokens": [1, 2, 3], "max_model_len": 100}, "POST /classify": answer}
    )
    url = str(server.make_url("")).rstrip("/")
    rm = VLLMReward(url, "rm", settings=FAST, activation="raw")
    try:
        with pytest.raises(ProtocolError) as err:
            await rm.score([[{"role": "user", "content": "q"}]])
    finally:
        await rm.close()
        await server.close()
    assert url in str(err.value) and field in str(err.value)


async def test_vllm_tokenize_without_tokens_is_a_protocol_error() -> None:
    server = await _stub({"POST /tokenize": {"count": 3}})
    url = str(server.make_url("")).rstrip("/")
    gen = VLLMGenerator(url, "m", settings=FAST, token_ids_mode="token_ids")
    try:
        with pytest.raises(ProtocolError, match="/tokenize tokens is not a list") as err:
            await gen.chat_prompt([{"role": "user", "content": "q"}])
    finally:
        await gen.close()
        await server.close()
    assert url in str(err.value)


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({"output_ids": [1]}, "meta_info is not an object"),
        ({"meta_info": {"finish_reason": {"type": "length"}}}, "output_ids is not a list"),
        (
            {"output_ids": [1, 77], "meta_info": {"finish_reason": {"type": "length"}}},
            "output_ids contains token id 77, outside the vocabulary of 50 tokens",
        ),
    ],
)
async def test_sglang_generator_rejects_malformed_answers(answer: Any, field: str) -> None:
    server = await _stub({"POST /generate": answer})
    url = str(server.make_url("")).rstrip("/")
    gen = SGLangGenerator(url, "m", settings=FAST, seed_field=None, vocab_size=50)
    try:
        with pytest.raises(ProtocolError) as err:
            await gen.generate([1], max_tokens=4, seed=0, params=SamplingParams())
    finally:
        await gen.close()
        await server.close()
    assert url in str(err.value) and field in str(err.value)


async def test_llamacpp_reads_the_vocabulary_size_and_rejects_ids_outside_it() -> None:
    server = await _stub(
        {
            "GET /health": {"status": "ok"},
            "GET /props": {"default_generation_settings": {"n_ctx": 512}},
            "GET /v1/models": {"data": [{"id": "m", "meta": {"n_vocab": 32}}]},
            "POST /tokenize": {"tokens": [1]},
            "POST /completion": {"tokens": [3, 32], "stop_type": "limit", "tokens_predicted": 2},
        }
    )
    url = str(server.make_url("")).rstrip("/")
    gen = LlamaCppGenerator(url, "m", settings=FAST, eos_token_id=2, startup_timeout=5)
    try:
        await gen.start()
        assert gen.vocab_size == 32
        with pytest.raises(ProtocolError) as err:
            await gen.generate([1], max_tokens=4, seed=0, params=SamplingParams())
    finally:
        await gen.close()
        await server.close()
    assert url in str(err.value)
    assert "tokens contains token id 32, outside the vocabulary of 32 tokens" in str(err.value)


# ---- malformed server answers: a step records the failure, stores nothing --------------------


def _empty_choices(body: Any) -> Any:
    return {**body, "choices": []}


def _huge_id(body: Any) -> Any:
    body["choices"][0]["token_ids"] = [10**6]
    return body


@pytest.mark.parametrize(
    ("mutation", "field"),
    [(_empty_choices, "completion answer has no choices"), (_huge_id, "token id 1000000")],
)
def test_malformed_answer_is_a_recorded_step_failure(
    mutation: Callable[[Any], Any],
    field: str,
    sqlite_url: str,
    tmp_path: Path,
    toy: tuple[str, str],
) -> None:
    with serve_in_background(proxy_app(toy[0], mutate={"/v1/completions": mutation})) as proxy:
        cfg = sweep_config("garbage", proxy, toy[1], prompts=1, beta=1.0, steps=1, chains=1)
        cfg["generator"].update(max_retries=1, vocab_size=50)
        cfg["execution"] = {"max_attempts": 1}
        path = tmp_path / "garbage.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = invoke("run", str(path), "--database", sqlite_url, "--quiet", "--no-check")
    assert_clean_failure(result)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    with sessions() as s:
        (chain,) = s.execute(select(Chain)).scalars().all()
        assert s.execute(select(Proposal.id)).first() is None
    assert chain.status == "failed" and chain.state_tokens is None and chain.current_step == -1
    assert chain.last_error.startswith("step 0: ProtocolError: ")
    assert proxy in chain.last_error and field in chain.last_error


# ---- databases ------------------------------------------------------------------------------


def _one_line_error(result: Result, *forbidden: str) -> str:
    out = assert_clean_failure(result)
    assert len(out.strip().splitlines()) == 1 and out.startswith("Error: "), out
    for word in forbidden:
        assert word not in out
    return out


@pytest.mark.parametrize("command", [["sweep", "list"], ["sweep", "status", "x"], ["export", "x"]])
def test_empty_database_says_run_db_upgrade(
    command: list[str], db_url: str, tmp_path: Path
) -> None:
    if db_url.startswith("sqlite"):
        Path(db_url.removeprefix("sqlite:///")).touch()  # exists, but holds no tables
    extra = ["-o", str(tmp_path / "out")] if command[0] == "export" else []
    out = _one_line_error(invoke(*command, *extra, "--database", db_url))
    assert "has no qalign schema" in out and "qalign db upgrade" in out


def test_missing_sqlite_file_is_not_created_by_a_read(tmp_path: Path) -> None:
    path = tmp_path / "nothing.sqlite"
    out = _one_line_error(invoke("sweep", "list", "--database", f"sqlite:///{path}"))
    assert "qalign db upgrade" in out and not path.exists()


def test_newer_schema_is_refused_everywhere(sqlite_url: str, tmp_path: Path) -> None:
    ensure_schema(sqlite_url)
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": "ffff_future"})
    engine.dispose()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    for args in (
        ["sweep", "list"],
        ["sweep", "status", "fuzz"],
        ["run", str(cfg), "--no-check"],
        ["db", "upgrade"],
        ["db", "check"],
    ):
        out = _one_line_error(invoke(*args, "--database", sqlite_url))
        assert "migrated by a newer qalign" in out and "ffff_future" in out, args


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://u:S3cretPW@db.example/q", "unsupported database backend 'mysql'"),
        ("postgresq://u:S3cretPW@127.0.0.1/q", "unsupported database backend 'postgresq'"),
        ("not a database url", "malformed database URL"),
        ("postgresql://postgres:S3cretPW@127.0.0.1:1/test", "cannot connect to PostgreSQL"),
        (
            "postgresql://postgres:S3cretPW@no-such-host.invalid/test?connect_timeout=3",
            "check the host name",
        ),
        ("postgresql://postgres:S3cretPW@127.0.0.1:5432/no_such_db_q", "has no database"),
        ("sqlite:////no/such/dir/q.sqlite", "does not exist"),
    ],
)
def test_wrong_database_urls_give_one_redacted_line(url: str, needle: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    for args in (["sweep", "list"], ["run", str(cfg), "--no-check"], ["db", "upgrade"]):
        out = _one_line_error(invoke(*args, "--database", url), "S3cretPW")
        assert needle in out, (args, out)
