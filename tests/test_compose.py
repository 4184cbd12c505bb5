"""docker-compose.yml agrees with itself, with the CLI and with its example sweep."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from qalign.cli import main
from qalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
EXAMPLE = ROOT / "examples" / "compose-sweep.yaml"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "m" else 1)


def test_usage_lines_name_real_services_commands_and_files():
    services = compose()["services"]
    lines = [
        ln.lstrip("# ").strip()
        for ln in COMPOSE.read_text().splitlines()
        if ln.lstrip("# ").startswith("docker compose")
    ]
    runs = [ln for ln in lines if " run " in ln]
    assert runs, "docker-compose.yml shows how to create and run a sweep"
    name = load_config(EXAMPLE).name
    for line in runs:
        args = shlex.split(line)
        service, command = args[args.index("--rm") + 1], args[args.index("--rm") + 2 :]
        assert service in services, line
        assert command[0] == "qalign", f"the image has no entrypoint: {line}"
        for arg in command[1:]:
            if arg.endswith(".yaml"):
                assert (ROOT / arg).exists(), line  # the repository is mounted at /work
            elif not arg.startswith("-") and arg not in ("sweep", "create", "run", "status"):
                assert arg == name, line
        out = CliRunner().invoke(main, [*[a for a in command[1:3]], "--help"])
        assert out.exit_code == 0, (line, out.output)


def test_workers_outlast_a_generator_request_and_gpus_are_distinct():
    services = compose()["services"]
    timeout = load_config(EXAMPLE).generator.timeout
    assert seconds(services["worker"]["stop_grace_period"]) > timeout
    devices = [
        tuple(d["device_ids"])
        for s in ("generator", "reward")
        for d in services[s]["deploy"]["resources"]["reservations"]["devices"]
    ]
    assert len(devices) == 2 and len(set(devices)) == 2 and all(devices)


def test_example_sweep_points_at_the_compose_services():
    services = compose()["services"]
    cfg = load_config(EXAMPLE)
    for section, service in ((cfg.generator, "generator"), (cfg.reward, "reward")):
        assert section is not None
        (url,) = section.urls
        m = re.fullmatch(r"http://([\w-]+):(\d+)", url)
        assert m and m[1] == service, url
        command = services[service]["command"]
        assert command[command.index("--port") + 1] == m[2], (service, url)
