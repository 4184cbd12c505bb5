"""`qalign eval`: check every proposal of a sweep with its task and store the verdicts.

Each prompt's task comes from its stored row (`prompts.row["task"]`, written for sweeps whose
dataset names a `task`) unless a task is given explicitly, which overrides it. A task is either
a registered name (`qalign.tasks.get_task`) or, for tasks that are not registered (a project's
own checker, a test's), an import path `package.module:attribute` naming a `Task` object or a
zero-argument class / factory that returns one (`resolve_task`).

Identical responses to the same prompt are checked once. Checks run in a thread pool (the
checkers bound their own time); verdicts are written in batches, each batch in one short
transaction that replaces the rows of its proposals, so running eval again (e.g. after the
sweep advanced, or with a fixed checker) gives the same rows.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from sqlalchemy import delete, func, insert, select

from qalign.analysis.data import AnalysisError
from qalign.storage.models import Answer, Chain, Prompt, Proposal, Run, Sweep, utcnow
from qalign.storage.repo import Sessions
from qalign.tasks.base import Check, Task, TaskItem

BATCH = 2000
DEFAULT_WORKERS = 8
_TASK_COLUMN = 40  # answers.task is String(40)


class TaskNotFoundError(AnalysisError):
    """A task name or import path that does not resolve to a task."""


def resolve_task(spec: str) -> Task:
    """A task from a registered name (`gsm8k`, `math500`, ...) or `package.module:attribute`.

    The attribute may be a task object (anything with `name` and `check(response, item)`) or a
    zero-argument callable (e.g. the task's class) returning one.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TaskNotFoundError(f"task {spec!r}: cannot import {module_name!r}: {exc}") from exc
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise TaskNotFoundError(f"task {spec!r}: {module_name!r} has no {attr!r}")
            obj = getattr(obj, part)
        if isinstance(obj, type) or (not hasattr(obj, "check") and callable(obj)):
            try:
                obj = obj()
            except Exception as exc:
                raise TaskNotFoundError(f"task {spec!r}: cannot create it: {exc}") from exc
        if not (hasattr(obj, "check") and hasattr(obj, "name")):
            raise TaskNotFoundError(
                f"task {spec!r} is not a task: it needs a `name` and a `check(response, item)`"
            )
        return cast(Task, obj)
    from qalign.tasks import get_task

    try:
        return get_task(spec)
    except ValueError as exc:
        raise TaskNotFoundError(str(exc)) from exc


def _jsonable(x: Any) -> Any:
    """Details as strict JSON: non-finite floats become None, unknown objects their str."""
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [_jsonable(v) for v in x]
    return str(x)


def _safe_check(task: Task, text: str, item: TaskItem) -> tuple[Check, bool]:
    """(verdict, failed): a checker that raises gives a wrong answer with the error recorded."""
    try:
        check = task.check(text, item)
    except Exception as exc:  # a checker bug must not lose the whole sweep's evaluation
        return Check(None, False, None, {"error": f"{type(exc).__name__}: {exc}"}), True
    return check, False


def _row(proposal_id: int, task_name: str, check: Check, now: Any) -> dict[str, Any]:
    return {
        "proposal_id": proposal_id,
        "task": task_name[:_TASK_COLUMN],
        "answer": None if check.answer is None else str(check.answer),
        "correct": bool(check.correct),
        "correct_loose": None if check.correct_loose is None else bool(check.correct_loose),
        "details": _jsonable(dict(check.details or {})),
        "checked_at": now,
    }


def _prompt_chunks(counts: Sequence[tuple[int, int]], batch: int) -> Iterator[list[int]]:
    """Groups of prompt ids with about `batch` proposals between them (a big prompt alone)."""
    chunk: list[int] = []
    size = 0
    for pid, n in counts:
        if chunk and size + n > batch:
            yield chunk
            chunk, size = [], 0
        chunk.append(pid)
        size += n
    if chunk:
        yield chunk


def _write(sessions: Sessions, rows: list[dict[str, Any]]) -> None:
    """Replace the answers of these proposals, in one transaction."""
    with sessions.begin() as s:
        for start in range(0, len(rows), 500):
            part = rows[start : start + 500]
            s.execute(
                delete(Answer).where(Answer.proposal_id.in_([r["proposal_id"] for r in part]))
            )
            s.execute(insert(Answer), part)


def _items(
    sessions: Sessions, sweep_id: int, task: str | None
) -> tuple[str, dict[int, tuple[Task, TaskItem]], list[tuple[int, int]]]:
    """(sweep name, each prompt's task and item, (prompt id, proposals) in prompt order)."""
    with sessions() as s:
        sweep_name = s.execute(select(Sweep.name).where(Sweep.id == sweep_id)).scalar_one()
        prompts = s.execute(
            select(Prompt.id, Prompt.prompt_index, Prompt.messages, Prompt.reference, Prompt.row)
            .where(Prompt.sweep_id == sweep_id)
            .order_by(Prompt.id)
        ).all()
        per_prompt: dict[int, int] = {
            pid: int(n)
            for pid, n in s.execute(
                select(Chain.prompt_id, func.count(Proposal.id))
                .join(Proposal, Proposal.chain_id == Chain.id)
                .join(Run, Run.id == Chain.run_id)
                .where(Run.sweep_id == sweep_id)
                .group_by(Chain.prompt_id)
            )
        }
    tasks: dict[str, Task] = {}
    items: dict[int, tuple[Task, TaskItem]] = {}
    for pid, index, messages, reference, row in prompts:
        name = task or (row or {}).get("task")
        if not name:
            raise AnalysisError(
                f"sweep {sweep_name!r}: prompt {index} names no task (its dataset has no "
                "`task`); pass one with --task NAME (a registered task or module:attribute)"
            )
        if name not in tasks:
            tasks[name] = resolve_task(name)
        meta = (row or {}).get("meta") or {}
        items[pid] = (tasks[name], TaskItem(list(messages), reference, dict(meta)))
    order = [(pid, per_prompt[pid]) for pid, *_ in prompts if per_prompt.get(pid)]
    return sweep_name, items, order


def _pages(sessions: Sessions, prompt_ids: list[int], batch: int) -> Iterator[list[Any]]:
    """(proposal id, prompt id, text) of these prompts' proposals, `batch` at a time; each page
    is read in its own short transaction (keyset on the proposal id)."""
    last = -1
    while True:
        with sessions() as s:
            page = s.execute(
                select(Proposal.id, Chain.prompt_id, Proposal.text)
                .join(Chain, Chain.id == Proposal.chain_id)
                .where(Chain.prompt_id.in_(prompt_ids), Proposal.id > last)
                .order_by(Proposal.id)
                .limit(batch)
            ).all()
        if not page:
            return
        last = page[-1][0]
        yield list(page)


def evaluate_sweep(
    sessions: Sessions,
    sweep_id: int,
    *,
    task: str | None = None,
    progress: bool = True,
    workers: int = DEFAULT_WORKERS,
    batch: int = BATCH,
    on_error: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Check every proposal of a sweep and write its row of `answers`.

    Returns counts: `checked` (proposals checked, i.e. rows written), `distinct` (distinct
    (prompt, response) pairs, each checked once), `correct` (proposals judged correct),
    `errors` (distinct responses whose check raised; stored as wrong, the error in `details`,
    and passed to `on_error`).
    """
    sweep_name, items, order = _items(sessions, sweep_id, task)
    counts = {"checked": 0, "distinct": 0, "correct": 0, "errors": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(n for _, n in order)
        bar = tqdm(total=total, desc=f"eval {sweep_name}", unit="proposal", leave=False)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for chunk in _prompt_chunks(order, batch):
                # Verdicts by (prompt, hash of the response), kept for one chunk of prompts.
                verdicts: dict[tuple[int, bytes], Check] = {}
                for page in _pages(sessions, chunk, batch):
                    keyed = [
                        (prop_id, pid, text, (pid, hashlib.sha1(text.encode()).digest()))
                        for prop_id, pid, text in page
                    ]
                    todo: dict[tuple[int, bytes], tuple[Task, str, TaskItem]] = {}
                    for _, pid, text, key in keyed:
                        if key not in verdicts and key not in todo:
                            todo[key] = (items[pid][0], text, items[pid][1])
                    results = pool.map(lambda job: _safe_check(*job), list(todo.values()))
                    for key, (check, failed) in zip(list(todo), results, strict=True):
                        verdicts[key] = check
                        counts["distinct"] += 1
                        counts["errors"] += failed
                        if failed and on_error is not None:
                            on_error(str(check.details.get("error")))
                    now = utcnow()
                    rows = [
                        _row(prop_id, str(items[pid][0].name), verdicts[key], now)
                        for prop_id, pid, _, key in keyed
                    ]
                    _write(sessions, rows)
                    counts["checked"] += len(rows)
                    counts["correct"] += sum(r["correct"] for r in rows)
                    if bar is not None:
                        bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    return counts


__all__ = ["BATCH", "TaskNotFoundError", "evaluate_sweep", "resolve_task"]
