"""Tasks: evaluation datasets with the paper's prompt templates and answer checks.

`get_task(name, **options)` returns a fresh task; `options` go to the task's constructor:

- `gsm8k`: openai/gsm8k `main`, test
- `gsm8k-socratic`: openai/gsm8k `socratic`, test
- `gsm-symbolic-p1`, `gsm-symbolic-p2`: apple/GSM-Symbolic `p1` / `p2`, test
- `math500`: HuggingFaceH4/MATH-500, test
- `mmlu-redux`: edinburgh-dawg/mmlu-redux-2.0 (one config per subject), test; options
  `only_ok=True`, `shuffle_choices=True`, `choice_seed=0`
- `truthfulqa-mc1`: truthfulqa/truthful_qa `multiple_choice`, validation; options
  `shuffle_choices=True`, `choice_seed=0`
- `ifeval`: google/IFEval, train
- `custom`: local files only; options `prompt_field`, `answer_field`, `system_prompt`,
  `template`, `checker`

(the hub dataset is what `load(None, ...)` reads).

`task.load(path, subset=, split=, limit=, shuffle_seed=)` reads a local file or folder (e.g.
`../shared/data/gsm8k`), or the hub dataset when `path` is None; `split` only applies to the hub.
Every item's `meta` records `source_index` (the row's position in the loaded data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qalign.tasks.base import Check, Task, TaskItem
from qalign.tasks.custom import CustomTask
from qalign.tasks.gsm8k import GSM8KTask
from qalign.tasks.ifeval import IFEvalTask
from qalign.tasks.math500 import Math500Task
from qalign.tasks.mmlu import MMLUReduxTask
from qalign.tasks.truthfulqa import TruthfulQAMC1Task

_FACTORIES: dict[str, Callable[..., Task]] = {
    "gsm8k": lambda **kw: GSM8KTask("gsm8k", **kw),
    "gsm8k-socratic": lambda **kw: GSM8KTask("gsm8k-socratic", **kw),
    "gsm-symbolic-p1": lambda **kw: GSM8KTask("gsm-symbolic-p1", **kw),
    "gsm-symbolic-p2": lambda **kw: GSM8KTask("gsm-symbolic-p2", **kw),
    "math500": Math500Task,
    "mmlu-redux": MMLUReduxTask,
    "truthfulqa-mc1": TruthfulQAMC1Task,
    "ifeval": IFEvalTask,
    "custom": CustomTask,
}

TASKS: tuple[str, ...] = tuple(_FACTORIES)


def get_task(name: str, **options: Any) -> Task:
    """A new task by registry name; `options` are passed to its constructor."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"task {name!r}: bad options {sorted(options)}: {exc}") from exc


__all__ = ["TASKS", "Check", "Task", "TaskItem", "get_task"]
