"""docker-compose.yml is checked without a Docker engine: commands exist, env names are read."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from qalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_required_services_exist():
    for name in (
        "redis",
        "postgres",
        "migrate",
        "worker",
        "reaper",
        "flower",
        "generator",
        "reward",
    ):
        assert name in SERVICES, name
    assert SERVICES["generator"]["profiles"] == ["gpu"]
    assert SERVICES["reward"]["profiles"] == ["gpu"]
    assert "--scale" not in str(SERVICES["worker"])  # scaled from the command line
    assert SERVICES["migrate"]["restart"] == "no"


def test_every_qalign_command_is_a_real_cli_command():
    runner = CliRunner()
    checked = 0
    for name, svc in SERVICES.items():
        cmd = svc.get("command")
        if not cmd or cmd[0] != "qalign":
            continue
        args = [a for a in cmd[1:]]
        # walk subcommands, then make click parse the options with --help appended
        out = runner.invoke(main, [*args, "--help"])
        assert out.exit_code == 0, (name, out.output)
        ctx_args = [a for a in args if not a.startswith("-")]
        assert ctx_args, name
        checked += 1
        # options given must be options the command declares
        for opt in (a for a in args if a.startswith("--")):
            assert opt in out.output, (name, opt)
    assert checked >= 3


def test_env_names_match_what_the_code_reads():
    code = "\n".join(p.read_text() for p in (ROOT / "qalign").rglob("*.py"))
    read = set(re.findall(r"QALIGN_[A-Z_]+", code))
    for name, svc in SERVICES.items():
        for key in svc.get("environment", {}) or {}:
            if key.startswith("QALIGN_"):
                assert key in read, (name, key)
    anchors = COMPOSE["x-qalign"]["environment"]
    assert {"QALIGN_DATABASE_URL", "QALIGN_BROKER_URL"} <= set(anchors)


def test_gpu_services_use_real_vllm_flags():
    gen = SERVICES["generator"]["command"]
    rm = SERVICES["reward"]["command"]
    assert gen[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert rm[0] == "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    assert "--runner" in rm and "pooling" in rm and "classify" in rm
    assert SERVICES["worker"]["environment"]["QALIGN_BROKER_URL"].startswith("redis://redis")
