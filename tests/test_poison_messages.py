"""Poison messages: a broker message that no worker can run is logged once, acknowledged and
dropped, and the worker goes on with real work.

Each poison message has the exact envelope kombu's Redis transport writes for a `qalign.step`
task (copied from a real `send_task`), with only its body (or its arguments) broken. Before the
fix the first one stopped the worker ("Unrecoverable error: ValueError('not enough values to
unpack ...')"), and since the message went back to the queue it stopped every worker after it.

Runs its own `redis-server` on a free port (never the shared one) and a fresh PostgreSQL
database.
"""

from __future__ import annotations

import base64
import copy
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.chaos import PrivateRedis
from qalign.dispatch.base import STEP_TASK
from qalign.storage.migrate import upgrade
from qalign.workers.messages import InvalidStepArgsError, body_problem, parse_step_args
from tests.sweeps_support import (
    Broker,
    Worker,
    check_invariants,
    cli,
    steps_committed,
    sweep_config,
    wait_done,
    workers,
    write_config,
)

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


# (kind, body, a fragment of the reason the log line must give). A `str` body is put in the
# envelope as it is (it should be base64); `bytes` are base64-encoded as kombu does.
POISON: list[tuple[str, bytes | str, str]] = [
    ("json object body", _json({"chain_id": 1, "step": 0}), "[args, kwargs, embed]"),
    ("non-UTF-8 bytes", b"\xff\xfe\x00 poison", "cannot be decoded"),
    ("text, not JSON", b"chain 1 step 0", "cannot be decoded"),
    ("list of one", _json([[1, 0]]), "[args, kwargs, embed]"),
    ("list of four", _json([[1, 0], {}, EMBED, {}]), "[args, kwargs, embed]"),
    ("bare number", _json(42), "[args, kwargs, embed]"),
    ("kwargs not an object", _json([[1, 0], [], EMBED]), "kwargs"),
    ("invalid base64", "%%% not base64 %%%", "base64"),
    ("args of the wrong type", _json([["x", None], {}, EMBED]), "chain_id"),
    ("one argument", _json([[1], {}, EMBED]), "step"),
    ("no such chain", _json([[987654321, 1], {}, EMBED]), "does not exist"),
]

Pushed = list[tuple[str, str, str]]  # (task id, kind, reason fragment)


def _template(broker: Broker) -> dict[str, Any]:
    """The envelope of a real `qalign.step` message, as it sits in the broker's list."""
    broker.dispatcher().enqueue(1, 0)
    raw = broker.redis.rpop(broker.queue)
    assert raw is not None, "send_task published nothing"
    envelope: dict[str, Any] = json.loads(raw)
    assert envelope["headers"]["task"] == STEP_TASK
    assert envelope["properties"]["body_encoding"] == "base64"
    return envelope


def _push_poison(broker: Broker, template: dict[str, Any]) -> Pushed:
    """LPUSH every poison message onto the worker's queue, as kombu's Redis transport does."""
    pushed: Pushed = []
    for kind, body, fragment in POISON:
        msg = copy.deepcopy(template)
        task_id = str(uuid.uuid4())
        msg["headers"].update(id=task_id, root_id=task_id, argsrepr=f"({kind})")
        msg["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
        msg["body"] = body if isinstance(body, str) else base64.b64encode(body).decode()
        broker.redis.lpush(broker.queue, json.dumps(msg))
        pushed.append((task_id, kind, fragment))
    return pushed


def _drop_lines(log: str, task_id: str) -> list[str]:
    return [line for line in log.splitlines() if task_id in line and "dropped" in line]


def _wait_for(what: str, ready: Callable[[], bool], worker: Worker, timeout: float = 240) -> None:
    """Wait for an observable state; fail at once if the worker died meanwhile."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert worker.proc.poll() is None, f"the worker died: {worker.output()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s: {worker.output()}"
        time.sleep(0.1)


def _all_dropped(worker: Worker, pushed: Pushed) -> Callable[[], bool]:
    return lambda: all(_drop_lines(worker.output(), task_id) for task_id, _, _ in pushed)


@pytest.mark.timeout(540)
def test_poison_messages_are_dropped_and_the_sweep_completes(
    pg_url: str, tmp_path: Path, toy: tuple[str, str]
) -> None:
    chains, steps = 4, 8
    rd = PrivateRedis(log=tmp_path / "redis.log")
    rd.start()
    try:
        broker = Broker(rd.url)
        upgrade(pg_url)
        cfg = sweep_config("poison", *toy, prompts=2, beta=1.0, steps=steps, chains=2)
        path = write_config(tmp_path, cfg)
        created = cli("sweep", "create", str(path), "--database", pg_url, env=broker.env())
        assert created.returncode == 0, created.stderr
        template = _template(broker)
        early = _push_poison(broker, template)  # the first messages the worker ever sees
        # One step per task, so real step messages keep flowing through the queue.
        worker = Worker(
            "poison@host",
            pg_url,
            broker,
            concurrency=4,
            env={"QALIGN_STEPS_PER_TASK": "1", "QALIGN_HAND_ON": "always"},
            log_dir=tmp_path,
        )
        with workers(worker):
            _wait_for("line for every early poison message", _all_dropped(worker, early), worker)
            run = cli("sweep", "run", "poison", "--database", pg_url, env=broker.env())
            assert run.returncode == 0, run.stderr
            _wait_for("progress", lambda: steps_committed(pg_url) >= chains * 2, worker)
            late = _push_poison(broker, template)  # among the real step messages
            wait_done(pg_url, chains, timeout=300)
            _wait_for("line for every late poison message", _all_dropped(worker, late), worker)
            # Every message was acknowledged: nothing waits in the queue or in kombu's unacked
            # hash (which would bring a message back after the visibility timeout).
            _wait_for(
                "empty queue and unacked hash",
                lambda: broker.queued() == 0 and broker.redis.hlen("unacked") == 0,
                worker,
            )
            assert worker.proc.poll() is None
            log = worker.output()
    finally:
        rd.kill()
    check_invariants(pg_url)  # one proposal per (chain, step), states match their replay
    for task_id, kind, fragment in early + late:
        lines = _drop_lines(log, task_id)
        assert len(lines) == 1, (kind, lines)  # one line per message, logged once
        assert fragment in lines[0], (kind, lines[0])
    assert "Traceback" not in log, log[-4000:]
    assert "CRITICAL" not in log, log[-4000:]


# ---- the pure checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ([3, 0], {}, (3, 0)),
        ((7, 12), {}, (7, 12)),
        ([5], {"step": 2}, (5, 2)),
        ([], {"chain_id": 9, "step": 1}, (9, 1)),
    ],
)
def test_parse_step_args_accepts_a_chain_and_a_step(
    args: Any, kwargs: Any, expected: tuple[int, int]
) -> None:
    assert parse_step_args(args, kwargs) == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (["x", None], {}, "chain_id is 'x'"),
        ([1], {}, "step is missing"),
        ([], {}, "chain_id is missing"),
        ([1, 2, 3], {}, "3 positional"),
        ([1, True], {}, "step is True"),
        ([1, 2.0], {}, "step is 2.0"),
        ([0, 1], {}, "chain_id is 0"),
        ([1, -1], {}, "step is -1"),
        ([1, 2], {"step": 2}, "step is given twice"),
        ([1, 2], {"attempt": 1}, "unexpected keyword argument 'attempt'"),
        ("12", {}, "args is a str"),
        ([1, 2], [], "kwargs is a list"),
    ],
)
def test_parse_step_args_names_what_is_wrong(args: Any, kwargs: Any, fragment: str) -> None:
    with pytest.raises(InvalidStepArgsError, match=r"qalign\.step takes") as info:
        parse_step_args(args, kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([[1, 0], {}, EMBED], None),
        ([[1, 0], {}, None], None),
        ({"args": [1, 0], "kwargs": {}}, None),  # Celery's hybrid protocol-1 body
        ({"chain_id": 1}, "[args, kwargs, embed]"),
        ([[1, 0]], "[args, kwargs, embed]"),
        ("[[1, 0], {}, {}]", "[args, kwargs, embed]"),
        (42, "[args, kwargs, embed]"),
        ([{"a": 1}, {}, {}], "args"),
        ([[1, 0], [], {}], "kwargs"),
        ([[1, 0], {}, []], "embed"),
        ({"args": 5}, "args"),
    ],
)
def test_body_problem(body: Any, problem: str | None) -> None:
    found = body_problem(body)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
