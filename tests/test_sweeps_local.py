"""`qalign run` (embedded default: SQLite, no broker), config validation, and the CLI surface."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from qalign.cli import main
from qalign.config import ConfigError, load_config, parse_config
from qalign.scheduler.sweeps import create_sweep
from qalign.storage.engine import make_engine, make_sessionmaker
from qalign.storage.migrate import upgrade
from qalign.storage.models import Sweep
from tests.stub_servers import Gate, proxy_app, serve_in_background
from tests.sweeps_support import (
    QALIGN,
    ROOT,
    check_invariants,
    cli,
    steps_committed,
    sweep_config,
    write_config,
)


def test_qalign_run_on_sqlite_and_rerun_resumes(sqlite_url, tmp_path, toy):
    cfg = sweep_config("local", *toy, prompts=8, beta=[0.5, 1.0], steps=10, chains=2)
    path = write_config(tmp_path, cfg)
    out = cli("run", str(path), "--database", sqlite_url, "--quiet")
    assert out.returncode == 0, out.stderr
    assert "created sweep 'local'" in out.stderr
    check_invariants(sqlite_url)
    assert steps_committed(sqlite_url) == 32 * 11
    again = cli("run", str(path), "--database", sqlite_url, "--quiet")
    assert again.returncode == 0 and "resuming sweep 'local'" in again.stderr
    assert steps_committed(sqlite_url) == 32 * 11


def test_interrupted_run_resumes_where_it_stopped(sqlite_url, tmp_path, toy):
    # The generator sits behind a gate that passes 60 of the 208 generations the sweep needs
    # and holds the rest, so the run cannot finish before the interrupt, however fast or slow
    # the machine; the interrupt is sent once 40 committed steps are seen in the database.
    gen_url, rm_url = toy
    gate = Gate(allow=60)
    with serve_in_background(proxy_app(gen_url, gate=gate)) as gated:
        cfg = sweep_config("interrupt", gated, rm_url, prompts=4, beta=1.0, steps=12, chains=4)
        cfg["generator"]["timeout"] = 300  # held requests wait for the signal, not a retry
        path = write_config(tmp_path, cfg)
        proc = subprocess.Popen(
            [*QALIGN, "run", str(path), "--database", sqlite_url, "--quiet"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300  # wide for a loaded machine, < pytest's 600 s
            committed = 0
            while committed < 40:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, f"only {committed} steps in 300 s"
                time.sleep(0.2)
                if os.path.exists(sqlite_url.removeprefix("sqlite:///")):
                    with contextlib.suppress(Exception):  # the schema may not exist yet
                        committed = steps_committed(sqlite_url)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            gate.open()  # held requests end, so the proxy can shut down
        assert proc.returncode != 0, err
        assert "run the same command again" in err
        partial = steps_committed(sqlite_url)
        assert 40 <= partial <= 60 < 16 * 13  # no more than the gate let through
        out = cli("run", str(path), "--database", sqlite_url, "--quiet")
        assert out.returncode == 0, out.stderr
    check_invariants(sqlite_url)
    assert steps_committed(sqlite_url) == 16 * 13


BAD = [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"steps": "many"}, "steps.0: Input should be a valid integer"),
    ({"beta": -1}, "beta.0: Input should be greater than 0"),
    ({"generator": {"urls": ["ftp://x"], "model": "toy-lm"}}, "generator.urls"),
    ({"reward": None}, "needs a `reward` section"),
    ({"index": "gaussian"}, "unknown index distribution"),
]


POWER_BAD = [
    ({}, "needs `alpha`"),
    ({"alpha": 2.0, "reward": {"urls": ["http://x"], "model": "m"}}, "uses no reward model"),
    ({"alpha": 2.0, "beta": 1.0}, "has no `beta`"),
    ({"alpha": [2.0], "temperature": [1.0, 0.7]}, "proposes at temperature 1"),
    ({"alpha": 0}, "alpha.0: Input should be greater than 0"),
    ({"alpha": 2.0, "index": "last_block:1"}, "last_block size must be >= 2"),
    ({"alpha": 2.0, "chains_per_prompt": 2, "stop_when": {"rhat": 1.1, "ess": 10}}, "no"),
]


@pytest.mark.parametrize(("patch", "message"), POWER_BAD)
def test_bad_power_configs_say_why(patch, message, toy):
    cfg = sweep_config("badpower", *toy, method="power")
    del cfg["reward"], cfg["beta"]
    with pytest.raises(ConfigError, match="badpower") as err:
        parse_config(cfg | patch, "badpower.yaml")
    assert message in str(err.value)


def test_power_configs_expand_their_alpha_grid(toy):
    cfg = sweep_config("power", *toy, method="power", alpha=[0.5, 2.0], index="last_block:4")
    del cfg["reward"], cfg["beta"]
    runs = parse_config(cfg).runs()
    assert [(r.alpha, r.beta, r.kernel.alpha) for r in runs] == [(0.5, None, 0.5), (2.0, None, 2.0)]
    assert [r.name for r in runs] == [
        "model=toy-lm,alpha=0.5,T=1,steps=10",
        "model=toy-lm,alpha=2,T=1,steps=10",
    ]
    assert type(runs[0]).from_config(runs[0].to_config()) == runs[0]
    assert not runs[0].kernel.needs_reward and runs[0].kernel.needs_logprobs
    with pytest.raises(ConfigError, match="use it with `method: power`"):
        parse_config(sweep_config("qa", *toy, alpha=2.0))


@pytest.mark.parametrize(("patch", "message"), BAD)
def test_bad_configs_name_the_key(patch, message, toy):
    cfg = sweep_config("bad", *toy) | patch
    with pytest.raises(ConfigError, match="bad") as err:
        parse_config(cfg, "bad.yaml")
    assert message in str(err.value)


def test_unreachable_server_or_unknown_model_writes_nothing(sqlite_url, toy, tmp_path):
    upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    unknown = sweep_config("unknown-model", *toy)
    unknown["generator"]["model"] = "no-such-model"
    unreachable = sweep_config("unreachable", "http://127.0.0.1:9", toy[1])
    unreachable["generator"]["max_retries"] = 1
    for cfg, needle in ((unknown, "no-such-model"), (unreachable, "127.0.0.1:9")):
        with pytest.raises(ConfigError, match=needle):
            create_sweep(sessions, parse_config(cfg), check=True, server_wait=2.0)
    with sessions() as s:
        assert s.execute(select(Sweep)).first() is None
    path = write_config(tmp_path, unknown)
    out = cli("run", str(path), "--database", sqlite_url, "--quiet")
    assert out.returncode != 0 and "no-such-model" in out.stderr and "Traceback" not in out.stderr


def test_example_config_is_valid():
    cfg = load_config(ROOT / "examples" / "sweep.yaml")
    assert len(cfg.runs()) == 2


def test_cli_lists_every_command_with_examples():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    for name in ("db", "sweep", "run", "worker", "export", "toy-server", "demo"):
        assert name in top.output
    for args in (
        ["db", "upgrade"],
        ["db", "check"],
        ["sweep", "create"],
        ["sweep", "list"],
        ["sweep", "show"],
        ["sweep", "run"],
        ["sweep", "resume"],
        ["sweep", "extend"],
        ["sweep", "cancel"],
        ["sweep", "status"],
        ["sweep", "reap"],
        ["run"],
        ["worker"],
        ["export"],
    ):
        out = runner.invoke(main, [*args, "--help"])
        assert out.exit_code == 0, (args, out.output)
        assert "Example" in out.output, args


def test_status_json_and_cancel(sqlite_url, tmp_path, toy):
    cfg = sweep_config("statusy", *toy, prompts=2, beta=1.0, steps=2, chains=1)
    path = write_config(tmp_path, cfg)
    assert cli("run", str(path), "--database", sqlite_url, "--quiet").returncode == 0
    rows = json.loads(cli("sweep", "status", "statusy", "--database", sqlite_url, "--json").stdout)
    (row,) = rows
    assert row["chains_done"] == row["chains_total"] == 2
    assert row["steps_done"] == row["steps_total"] == 6
    listed = cli("sweep", "list", "--database", sqlite_url, "--json")
    assert json.loads(listed.stdout)[0]["name"] == "statusy"
    cancel = cli("sweep", "cancel", "statusy", "--database", sqlite_url)
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    missing = cli("sweep", "status", "nope", "--database", sqlite_url)
    assert missing.returncode != 0 and "no sweep 'nope'" in missing.stderr


def test_export_writes_jsonl_and_parquet(sqlite_url, tmp_path, toy):
    import pyarrow.parquet as pq

    cfg = sweep_config("exporty", *toy, prompts=2, beta=1.0, steps=3, chains=2)
    path = write_config(tmp_path, cfg)
    assert cli("run", str(path), "--database", sqlite_url, "--quiet").returncode == 0
    out = cli("export", "exporty", "-o", str(tmp_path / "out"), "--database", sqlite_url)
    assert out.returncode == 0, out.stderr
    assert "wrote 4 chains and 16 proposals" in out.stdout
    lines = (tmp_path / "out" / "proposals.jsonl").read_text().splitlines()
    assert len(lines) == 16
    first = json.loads(lines[0])
    assert first["step"] == 0 and first["accepted"] is True and first["new_tokens"]
    table = pq.read_table(tmp_path / "out" / "proposals.parquet")
    assert table.num_rows == 16 and "reward_tokens" in table.column_names
    assert pq.read_table(tmp_path / "out" / "chains.parquet").num_rows == 4


def test_dataset_from_a_local_file_with_limit_and_shuffle():
    from qalign.config import DatasetConfig
    from qalign.datasets import load_prompts

    gsm8k = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not gsm8k.exists():
        pytest.skip("shared/data is not beside this checkout")
    rows = load_prompts(DatasetConfig(path=str(gsm8k), limit=5, system_prompt="Be brief."))
    assert len(rows) == 5
    assert rows[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert rows[0].messages[1]["content"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert rows[0].reference is not None and rows[0].reference.endswith("#### 18")
    shuffled = load_prompts(DatasetConfig(path=str(gsm8k), limit=5, shuffle_seed=3))
    again = load_prompts(DatasetConfig(path=str(gsm8k), limit=5, shuffle_seed=3))
    assert [r.row["source_index"] for r in shuffled] == [r.row["source_index"] for r in again]
    assert [r.row["source_index"] for r in shuffled] != list(range(5))
    with pytest.raises(ConfigError, match="column"):
        load_prompts(DatasetConfig(path=str(gsm8k), prompt_field="nope"))


def test_score_fills_rewards_of_unscored_samples_once_per_distinct_response(
    sqlite_url, tmp_path, toy
):
    from qalign.storage.models import Chain, Proposal

    cfg = sweep_config("unscored", *toy, prompts=2, chains=40)
    cfg["method"] = "ancestral"
    cfg.pop("reward")
    cfg.pop("steps")
    cfg.pop("beta")
    path = write_config(tmp_path, cfg)
    assert cli("run", str(path), "--database", sqlite_url, "--quiet").returncode == 0
    sessions = make_sessionmaker(make_engine(sqlite_url))
    with sessions() as s:
        assert all(r is None for r in s.execute(select(Proposal.reward)).scalars())
    no_rm = cli("score", "unscored", "--database", sqlite_url)
    assert no_rm.returncode != 0 and "no reward model" in no_rm.stderr
    out = cli(
        "score", "unscored", "--database", sqlite_url,
        "--reward-url", toy[1], "--reward-model", "toy-rm", "--reward-format", "vllm",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    scored, distinct = [int(w) for w in out.stdout.split() if w.isdigit()][:2]
    assert scored == 80 and distinct < scored  # toy responses repeat: scored once per prompt
    with sessions() as s:
        rewards = s.execute(select(Proposal.reward, Proposal.reward_tokens)).all()
        assert all(r is not None and n and n > 0 for r, n in rewards)
        assert all(r is not None for r in s.execute(select(Chain.state_reward)).scalars())
    again = cli(
        "score", "unscored", "--database", sqlite_url,
        "--reward-url", toy[1], "--reward-model", "toy-rm",
    )  # fmt: skip
    assert "scored 0 proposal(s)" in again.stdout


def test_lockstep_mode_gives_the_same_chains(sqlite_url, tmp_path, toy):
    """Lock-step only changes scheduling: the counter-based randomness makes every decision the
    same, so both modes store identical proposals."""
    from qalign.storage.models import Proposal

    results = []
    for mode in ("free", "lockstep"):
        url = sqlite_url.replace(".sqlite", f"-{mode}.sqlite")
        cfg = sweep_config("lock", *toy, prompts=2, beta=1.0, steps=5, chains=3)
        path = write_config(tmp_path, cfg)
        extra = ["--lockstep"] if mode == "lockstep" else []
        out = cli("run", str(path), "--database", url, "--quiet", *extra)
        assert out.returncode == 0, out.stderr
        check_invariants(url)
        with make_sessionmaker(make_engine(url))() as s:
            rows = s.execute(
                select(Proposal.chain_id, Proposal.step, Proposal.cut, Proposal.new_tokens,
                       Proposal.accepted).order_by(Proposal.chain_id, Proposal.step)
            ).all()  # fmt: skip
        results.append([(r[0], r[1], r[2], tuple(r[3]), r[4]) for r in rows])
    assert results[0] == results[1]


def test_sweeps_without_alpha_keep_their_fingerprint():
    """Pinned from before `alpha` existed: resuming an old sweep must still find it."""
    cfg = parse_config(sweep_config("qa", "http://a:1", "http://b:2"))
    assert cfg.fingerprint() == "7139cc4830dca1beb09a10252f12bf6566720f7cbcf704a73e5c128cc4eed2cc"


def test_a_relative_dataset_path_resolves_beside_the_yaml_file(
    sqlite_url, tmp_path, toy, monkeypatch
):
    """`dataset.path: prompts.jsonl` is the file next to the YAML, from any working directory,
    and the sweep's fingerprint stays the one of the path as written."""
    here = tmp_path / "configs"
    here.mkdir()
    rows = [{"question": f"is {i} even?", "answer": "yes"} for i in range(3)]
    (here / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sweep_config("relpath", *toy, prompts=1, beta=1.0, steps=1, chains=1)
    cfg["dataset"] = {"path": "prompts.jsonl"}
    written = write_config(here, cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config(written)
    assert loaded.dataset.resolved_path() == str(here / "prompts.jsonl")
    assert loaded.fingerprint() == parse_config(cfg).fingerprint()
    upgrade(sqlite_url)
    out = CliRunner().invoke(main, ["sweep", "create", str(written), "--database", sqlite_url])
    assert out.exit_code == 0, out.output
    engine = make_engine(sqlite_url)
    try:
        with make_sessionmaker(engine)() as s:
            from qalign.storage.models import Prompt

            texts = [m for (m,) in s.execute(select(Prompt.messages)).all()]
    finally:
        engine.dispose()
    assert len(texts) == 3 and "is 0 even?" in json.dumps(texts)
    # A path that is not beside the YAML file is used as written (relative to the working dir).
    (elsewhere / "cwd.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg["dataset"] = {"path": "cwd.jsonl"}
    assert load_config(write_config(here, cfg)).dataset.resolved_path() == "cwd.jsonl"
