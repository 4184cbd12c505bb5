"""IFEval (google/IFEval, train split; 541 prompts with verifiable instructions).

Prompt: the dataset's `prompt` as the only user turn, unchanged (the paper's runs pass no
template for IFEval, so the QAlign repository's default template "{prompt}" applies).

Reference: None. `meta` holds what the instruction checker needs: `key`, `instruction_id_list`,
`kwargs` (one dict per instruction, listing only the arguments that are set: the hub's rows pad
them with null-valued keys, which are dropped here so local and hub rows agree) and `prompt`.
"""

from __future__ import annotations

from typing import Any

from qalign.tasks.base import Check, TaskItem
from qalign.tasks.custom import (
    StrPath,
    hub_rows,
    jsonable,
    no_subset,
    read_jsonl,
    resolve_file,
    select_indices,
    user_turn,
)

HUB_ID = "google/IFEval"
HUB_SPLIT = "train"


def _kwargs(raw: Any, n: int) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or len(raw) != n:
        raise ValueError(f"kwargs must be a list of {n} dicts, got {raw!r}")
    out = []
    for kw in raw:
        if kw is None:
            kw = {}
        if not isinstance(kw, dict):
            raise ValueError(f"kwargs entry is not a dict: {kw!r}")
        out.append({str(k): jsonable(v) for k, v in kw.items() if v is not None})
    return out


class IFEvalTask:
    name = "ifeval"

    def load(
        self,
        path: StrPath | None,
        *,
        subset: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> list[TaskItem]:
        """Items from a local JSONL file / folder holding `input_data.jsonl` (`split` unused),
        or from the hub when `path` is None."""
        no_subset(self.name, subset)
        if path is None:
            rows = hub_rows(HUB_ID, None, split or HUB_SPLIT)
            where = HUB_ID
        else:
            file = resolve_file(path, ("input_data.jsonl",), self.name)
            rows, where = read_jsonl(file), str(file)
        if not rows:
            raise ValueError(f"{self.name}: {where} has no rows")
        items = []
        for i in select_indices(len(rows), limit, shuffle_seed):
            row = rows[i]
            try:
                prompt = str(row["prompt"])
                ids = [str(x) for x in row["instruction_id_list"]]
                meta = {
                    "key": int(row["key"]),
                    "instruction_id_list": ids,
                    "kwargs": _kwargs(row["kwargs"], len(ids)),
                    "prompt": prompt,
                    "source_index": i,
                }
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{self.name}: {where} row {i}: {exc!s}") from exc
            items.append(TaskItem(messages=user_turn(prompt), reference=None, meta=meta))
        return items

    def check(self, response: str, item: TaskItem) -> Check:
        from qalign.tasks.checkers import check_ifeval

        return check_ifeval(response, item.meta)
