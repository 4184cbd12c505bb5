"""MATH-500 (HuggingFaceH4/MATH-500: the PRM800K 500-problem test subset of MATH).

Prompt: one user turn, the paper's template (QAlign repository, `scripts/
create_all_general_experiments.sh`, `PROMPT` for `HuggingFaceH4/MATH-500`):

    Solve the following math problem step-by-step: {problem}

    Present the answer in LaTex format: \\boxed{Your answer}

(The script passes the template through a double-quoted shell string, so the run there received
the two characters backslash-n where this template has line breaks; we use real line breaks, the
evident intent.)

Reference: the `answer` field verbatim (LaTeX, e.g. `\\left( 3, \\frac{\\pi}{2} \\right)`).
"""

from __future__ import annotations

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

TEMPLATE = (
    "Solve the following math problem step-by-step: {prompt}\n\n"
    "Present the answer in LaTex format: \\boxed{Your answer}"
)
HUB_ID = "HuggingFaceH4/MATH-500"
HUB_SPLIT = "test"


def prompt_text(problem: str) -> str:
    return TEMPLATE.replace("{prompt}", problem)


class Math500Task:
    name = "math500"

    def load(
        self,
        path: StrPath | None,
        *,
        subset: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> list[TaskItem]:
        """Items from a local JSONL file / folder holding `test.jsonl` (`split` unused), or from
        the hub when `path` is None."""
        no_subset(self.name, subset)
        if path is None:
            rows = hub_rows(HUB_ID, None, split or HUB_SPLIT)
            where = HUB_ID
        else:
            file = resolve_file(path, ("test.jsonl",), self.name)
            rows = read_jsonl(file)
            where = str(file)
        if not rows:
            raise ValueError(f"{self.name}: {where} has no rows")
        items = []
        for i in select_indices(len(rows), limit, shuffle_seed):
            row = rows[i]
            try:
                problem, answer = row["problem"], row["answer"]
            except KeyError as exc:
                raise ValueError(f"{self.name}: {where} row {i} has no {exc.args[0]!r}") from exc
            meta: dict[str, Any] = {"source_index": i}
            meta.update({k: row[k] for k in ("unique_id", "subject", "level") if k in row})
            items.append(
                TaskItem(
                    messages=user_turn(prompt_text(str(problem))), reference=str(answer), meta=meta
                )
            )
        return items

    def check(self, response: str, item: TaskItem) -> Check:
        from qalign.tasks.checkers import check_math

        if item.reference is None:
            raise ValueError("math500: this item has no reference answer")
        return check_math(response, item.reference)
