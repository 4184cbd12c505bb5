"""The shape of a task message, checked before anything acts on it.

Broker messages are hints from other processes (or from whoever can write to the broker), so a
worker checks them instead of trusting them: a message it cannot run is dropped with one line
saying why (see `qalign.workers.consumer`) and never stops the worker. Pure functions, no Celery
or kombu imports, so they can be tested and reused anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The `qalign.step` task's parameters, in order.
STEP_PARAMS = ("chain_id", "step")


class InvalidStepArgsError(ValueError):
    """A `qalign.step` message whose arguments are not one (chain_id, step) pair of integers."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_step_args(args: Any, kwargs: Any) -> tuple[int, int]:
    """`(chain_id, step)` from a `qalign.step` message's args and kwargs.

    Binds them the way Python binds `step(chain_id, step)` and requires plain integers,
    `chain_id >= 1` and `step >= 0` (JSON has no other integer type, so a float, a bool or a
    string is a message from elsewhere, not one to coerce). Raises `InvalidStepArgsError` naming
    what is wrong.
    """

    def bad(problem: str) -> InvalidStepArgsError:
        return InvalidStepArgsError(
            f"qalign.step takes (chain_id, step) as two integers; got args={_short(args)} "
            f"kwargs={_short(kwargs)}: {problem}"
        )

    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise bad(f"args is a {type(args).__name__}, not a list")
    if not isinstance(kwargs, Mapping):
        raise bad(f"kwargs is a {type(kwargs).__name__}, not an object")
    if len(args) > len(STEP_PARAMS):
        raise bad(f"{len(args)} positional arguments")
    bound = dict(zip(STEP_PARAMS, args, strict=False))
    for name, value in kwargs.items():
        if name not in STEP_PARAMS:
            raise bad(f"unexpected keyword argument {_short(name)}")
        if name in bound:
            raise bad(f"{name} is given twice")
        bound[name] = value
    values: list[int] = []
    for name, low in zip(STEP_PARAMS, (1, 0), strict=True):
        if name not in bound:
            raise bad(f"{name} is missing")
        value = bound[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(f"{name} is {_short(value)}, not an integer >= {low}")
        values.append(value)
    return values[0], values[1]


def body_problem(body: Any) -> str | None:
    """Why a decoded Celery task body cannot be run, or None when it has a runnable shape.

    Celery's protocol 2 sends `[args, kwargs, embed]` (a list, an object, and an object or
    null); Celery also runs a "hybrid" body, an object with `args` (and `kwargs`). Anything else
    makes Celery's request parser raise inside the consumer, which stops the worker.
    """
    if isinstance(body, Mapping) and "args" in body:
        args, kwargs = body.get("args"), body.get("kwargs", {})
        embed: Any = None
    elif isinstance(body, list | tuple) and len(body) == 3:
        args, kwargs, embed = body
    else:
        return f"the body is not [args, kwargs, embed]: {_short(body)}"
    if not isinstance(args, list | tuple):
        return f"the body's args is a {type(args).__name__}, not a list: {_short(args)}"
    if not isinstance(kwargs, Mapping):
        return f"the body's kwargs is a {type(kwargs).__name__}, not an object: {_short(kwargs)}"
    if embed is not None and not isinstance(embed, Mapping):
        return f"the body's embed is a {type(embed).__name__}, not an object: {_short(embed)}"
    return None


def drop_line(task_id: Any, task: Any, reason: str, detail: str = "") -> str:
    """The one log line for a dropped message: which message, and why.

    Workers and tasks both use it, so `grep 'dropped message'` finds every drop. Kept on one line
    whatever the reason's text holds.
    """
    where = f"task {task}" + (f", {detail}" if detail else "")
    text = f"dropped message {task_id} ({where}): {reason}; acknowledged, it will not be retried"
    return " ".join(text.split())
