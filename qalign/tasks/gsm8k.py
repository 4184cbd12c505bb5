"""GSM8K (main and socratic) and GSM-Symbolic (P1, P2): grade-school math word problems.

Prompt: one user turn, the paper's template (QAlign repository, `scripts/
create_all_general_experiments.sh`, `PROMPT` for `openai/gsm8k`; its `qalign/utils/data.py`
uses the same data path for GSM-Symbolic P1/P2):

    Solve the following grade school math problem step-by-step: {question}

Reference: the number after `####` in the answer field, with thousands commas removed
("1,600" -> "1600"). GSM-Symbolic uses the same answer format. The socratic variant has the same
questions and final answers as main; only the worked solutions differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qalign.tasks.base import Check, TaskItem
from qalign.tasks.custom import (
    StrPath,
    hub_rows,
    no_subset,
    read_jsonl,
    resolve_file,
    select_indices,
    user_turn,
)

TEMPLATE = "Solve the following grade school math problem step-by-step: {prompt}"


@dataclass(frozen=True)
class GSMSource:
    """Where one GSM-style dataset lives: its files inside a folder, and its hub location."""

    files: tuple[str, ...]
    hub_id: str
    hub_config: str
    hub_split: str = "test"


SOURCES: dict[str, GSMSource] = {
    "gsm8k": GSMSource(("test.jsonl",), "openai/gsm8k", "main"),
    "gsm8k-socratic": GSMSource(("test_socratic.jsonl",), "openai/gsm8k", "socratic"),
    # The hub repository stores p1/test.jsonl and p2/test.jsonl; a folder may be its root or the
    # p1 / p2 folder itself.
    "gsm-symbolic-p1": GSMSource(("p1/test.jsonl", "test.jsonl"), "apple/GSM-Symbolic", "p1"),
    "gsm-symbolic-p2": GSMSource(("p2/test.jsonl", "test.jsonl"), "apple/GSM-Symbolic", "p2"),
}

# Fields of GSM-Symbolic rows worth keeping in `meta` (they identify the template and instance).
_ID_FIELDS = ("id", "instance", "original_id")


def gsm_reference(answer: str) -> str:
    """The final answer of a GSM8K-format solution: the text after the last `####`, stripped,
    without thousands commas."""
    if "####" not in answer:
        raise ValueError(f"no '####' final answer in {answer[-80:]!r}")
    ref = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not ref:
        raise ValueError(f"empty final answer after '####' in {answer[-80:]!r}")
    return ref


def prompt_text(question: str) -> str:
    return TEMPLATE.replace("{prompt}", question)


class GSM8KTask:
    """GSM8K main / socratic and GSM-Symbolic P1 / P2 (`variant` is the registry name)."""

    def __init__(self, variant: str = "gsm8k") -> None:
        if variant not in SOURCES:
            raise ValueError(f"unknown GSM variant {variant!r}; known: {', '.join(SOURCES)}")
        self.name = variant
        self.source = SOURCES[variant]

    def load(
        self,
        path: StrPath | None,
        *,
        subset: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> list[TaskItem]:
        """Items from a local JSONL file / folder (`split` unused), or from the hub when `path` is
        None (`split` defaults to the test split)."""
        no_subset(self.name, subset)
        src = self.source
        if path is None:
            rows = hub_rows(src.hub_id, src.hub_config, split or src.hub_split)
            where = f"{src.hub_id} ({src.hub_config})"
        else:
            file = resolve_file(path, src.files, self.name)
            rows = read_jsonl(file)
            where = str(file)
        return self._items(rows, where, limit, shuffle_seed)

    def _items(
        self, rows: list[dict[str, Any]], where: str, limit: int | None, shuffle_seed: int | None
    ) -> list[TaskItem]:
        if not rows:
            raise ValueError(f"{self.name}: {where} has no rows")
        items = []
        for i in select_indices(len(rows), limit, shuffle_seed):
            row = rows[i]
            try:
                question, answer = row["question"], row["answer"]
                reference = gsm_reference(str(answer))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{self.name}: {where} row {i}: {exc!s}") from exc
            meta: dict[str, Any] = {"source_index": i}
            meta.update({k: row[k] for k in _ID_FIELDS if k in row})
            items.append(
                TaskItem(
                    messages=user_turn(prompt_text(str(question))), reference=reference, meta=meta
                )
            )
        return items

    def check(self, response: str, item: TaskItem) -> Check:
        from qalign.tasks.checkers import check_gsm8k

        if item.reference is None:
            raise ValueError(f"{self.name}: this item has no reference answer")
        return check_gsm8k(response, item.reference)
