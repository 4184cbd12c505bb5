"""What a task (dataset family) provides: prompts with the paper's templates, and answer checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TaskItem:
    """One evaluation item, ready to become a stored prompt.

    `reference` is the gold answer in the task's canonical answer form (what `extract` returns
    for a correct response); `meta` carries whatever `check` needs (shuffled choices, IFEval
    instruction ids and kwargs, the original row's id ...) and must be JSON-serialisable.
    """

    messages: list[dict[str, str]]
    reference: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """The verdict on one response."""

    answer: str | None  # canonical extracted answer (the key used by voting), None if none found
    correct: bool
    correct_loose: bool | None = None  # IFEval's loose variant; None elsewhere
    details: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A dataset family: GSM8K, MATH-500, MMLU-Redux, TruthfulQA MC1, IFEval, custom."""

    name: str

    def load(
        self,
        path: str | None,
        *,
        subset: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> list[TaskItem]:
        """Items in a deterministic order. `path` is a local file or folder (e.g. one under
        ../shared/data); None means the task's hub dataset (loaded through HF `datasets`)."""
        ...

    def check(self, response: str, item: TaskItem) -> Check:
        """Extract the answer from a response text and judge it against the item."""
        ...
