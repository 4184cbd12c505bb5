"""Bounded configs: absurd sizes, alias bombs, oversized files and self-referencing aliases are
refused by key, through the real CLI, before any database file, row or server is touched."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from qalign.storage.migrate import ensure_schema
from tests.sweeps_support import cli, sweep_config

# Nothing listens on port 9 (discard): code that would contact a server fails at once.
UNREACHABLE = "http://127.0.0.1:9"
# Well under pytest's patience: code without the limits hangs or allocates on some of these.
TIMEOUT = 120.0
TABLES = ("sweeps", "runs", "prompts", "chains", "proposals", "step_errors")


def _base() -> dict[str, Any]:
    cfg = sweep_config("bounds", UNREACHABLE, UNREACHABLE, prompts=1, beta=1.0, steps=1, chains=1)
    # A server check against the unreachable address gives up after about a second.
    cfg["generator"].update(timeout=1, max_retries=1)
    cfg["reward"].update(timeout=1, max_retries=1)
    return cfg


def _with(**changes: Any) -> Callable[[], str]:
    def build() -> str:
        cfg = _base()
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            node = cfg
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return yaml.safe_dump(cfg)

    return build


def _with_dataset(dataset_yaml: str) -> Callable[[], str]:
    """The base config with a hand-written `dataset` section (anchors and aliases)."""

    def build() -> str:
        cfg = _base()
        del cfg["dataset"]
        return yaml.safe_dump(cfg) + dataset_yaml

    return build


_BOMB = "dataset:\n  prompts: [q]\n  options:\n    l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 8)
)  # 9**7 (4.8 million) values from a 1 kB file
_SELF = "dataset:\n  prompts: [q]\n  options: &o {again: *o}\n"
_BIG = "dataset:\n  prompts:\n    - " + "y" * (1 << 20) + "\n"
_LONG_URL = UNREACHABLE + "/" + "u" * 300

CASES: list[tuple[str, Callable[[], str], tuple[str, ...]]] = [
    ("steps", _with(steps=1_000_001), ("steps: 1000001", "limit of 1000000")),
    (
        "chains_per_prompt",
        _with(chains_per_prompt=100_001),
        ("chains_per_prompt: 100001", "limit of 100000"),
    ),
    (
        "chains-per-sweep",
        # 11 runs x 10 prompts x 100000: each key alone is within its limit, the product is not.
        _with(
            chains_per_prompt=100_000,
            beta=[0.5 + i / 10 for i in range(11)],
            dataset={"prompts": [f"q{i}" for i in range(10)]},
        ),
        ("chains_per_prompt: 100000", "11 run(s) x 10 prompt(s)", "limit of 10000000"),
    ),
    ("name", _with(name="n" * 201), ("name: 'nnn", "201 characters", "limit of 200 characters")),
    (
        "generator.model",
        _with(generator__model="m" * 201),
        ("generator.model: 'mmm", "201 characters", "limit of 200 characters"),
    ),
    (
        "reward.model",
        _with(reward__model="r" * 201),
        ("reward.model: 'rrr", "201 characters", "limit of 200 characters"),
    ),
    (
        "generator.urls",
        _with(generator__urls=[_LONG_URL]),
        ("generator.urls: 'http://127.0.0.1:9", "limit of 300 characters"),
    ),
    (
        "generator.template_url",
        _with(generator__backend="sglang", generator__template_url=_LONG_URL),
        ("generator.template_url: 'http", "limit of 300 characters"),
    ),
    (
        "reward.urls",
        _with(reward__urls=[_LONG_URL]),
        ("reward.urls: 'http://127.0.0.1:9", "limit of 300 characters"),
    ),
    ("clamp", _with(clamp=float("inf")), ("clamp: inf is not a finite number",)),
    (
        "generator.timeout",
        _with(generator__timeout=float("inf")),
        ("generator.timeout: inf is not a finite number",),
    ),
    (
        "reward.timeout",
        _with(reward__timeout=float("inf")),
        ("reward.timeout: inf is not a finite number",),
    ),
    (
        "execution.stall_timeout",
        _with(execution__stall_timeout=float("inf")),
        ("execution.stall_timeout: inf is not a finite number",),
    ),
    (
        "max_new_tokens",
        _with(max_new_tokens=10**12),
        ("max_new_tokens: 1000000000000", "limit of 1000000"),
    ),
    (
        "max_prompt_length",
        _with(max_prompt_length=2**40),
        ("max_prompt_length: 1099511627776", "limit of 1000000"),
    ),
    (
        "generator.max_retries",
        _with(generator__max_retries=1001),
        ("generator.max_retries: 1001", "limit of 1000"),
    ),
    (
        "execution.max_attempts",
        _with(execution__max_attempts=10**9),
        ("execution.max_attempts: 1000000000", "limit of 1000"),
    ),
    (
        "reward.batch_size",
        _with(reward__batch_size=100_001),
        ("reward.batch_size: 100001", "limit of 100000"),
    ),
    (
        "execution.concurrency",
        _with(execution__concurrency=10**7),
        ("execution.concurrency: 10000000", "limit of 100000"),
    ),
    ("alias-bomb", _with_dataset(_BOMB), ("alias *l", "limit of 100000 values")),
    ("self-alias", _with_dataset(_SELF), ("alias *o at line", "refers to the value that holds it")),
    ("file-over-1MiB", _with_dataset(_BIG), ("limit of 1048576 bytes",)),
]
# Code without the limits would allocate these sweeps' chains (11 million) if it got past the
# server check, so on PostgreSQL they keep it; every other case skips it, so such code would
# write rows and the test would see them.
KEEP_SERVER_CHECK = {"chains-per-sweep"}


def _one_line_refusal(proc: subprocess.CompletedProcess[str], needles: tuple[str, ...]) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    for needle in needles:
        assert needle in lines[0], (needle, out[:2000])


def _write(tmp_path: Path, build: Callable[[], str]) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(build())
    return path


@pytest.mark.parametrize(("case", "build", "needles"), CASES, ids=[c[0] for c in CASES])
def test_sqlite_refusal_creates_no_file(
    case: str, build: Callable[[], str], needles: tuple[str, ...], tmp_path: Path
) -> None:
    """`qalign run` would create the SQLite file and check the servers: neither happens."""
    db = tmp_path / "q.sqlite"
    proc = cli("run", str(_write(tmp_path, build)), "--quiet", "--database", f"sqlite:///{db}",
               timeout=TIMEOUT)  # fmt: skip
    _one_line_refusal(proc, needles)
    assert not db.exists()


@pytest.mark.parametrize(("case", "build", "needles"), CASES, ids=[c[0] for c in CASES])
def test_postgresql_refusal_writes_no_rows(
    case: str, build: Callable[[], str], needles: tuple[str, ...], pg_url: str, tmp_path: Path
) -> None:
    ensure_schema(pg_url)
    check = [] if case in KEEP_SERVER_CHECK else ["--no-check"]
    proc = cli("sweep", "create", str(_write(tmp_path, build)), *check, "--database", pg_url,
               timeout=TIMEOUT)  # fmt: skip
    _one_line_refusal(proc, needles)
    engine = create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES}
    finally:
        engine.dispose()
    assert counts == dict.fromkeys(TABLES, 0)


def test_a_grid_too_big_for_any_dataset_is_refused_before_the_dataset_loads(
    tmp_path: Path,
) -> None:
    """101 runs x 100000 chains is over the sweep limit with a single prompt: the (missing)
    dataset file is never opened."""
    from qalign.config import ConfigLimitError, parse_config

    cfg = _base()
    cfg.update(chains_per_prompt=100_000, beta=[1.0 + i for i in range(101)])
    cfg["dataset"] = {"path": str(tmp_path / "never-read.jsonl")}
    with pytest.raises(ConfigLimitError, match=r"101 run\(s\) x at least 1 prompt\(s\)"):
        parse_config(cfg, "grid.yaml")
