"""The `custom` task: any local JSONL / JSON / CSV / TSV / Parquet file with a column mapping.

This module also holds the small file-reading and selection helpers every task module uses
(`read_records`, `resolve_file`, `select_indices`, `hub_rows`, `item_rng`, `jsonable`): the
custom task is the generic loader, the named tasks add their data's quirks on top.

Custom rows become one user turn: the `prompt_field` column, optionally wrapped in a template
string containing `{prompt}` (substituted literally, so other braces such as `\\boxed{}` stay as
they are), optionally preceded by a system turn. The reference is the `answer_field` column as a
string (None when `answer_field` is None or the cell is empty). `check` uses the MATH checker by
default (`checker="math"`: a `\\boxed{}` answer compared for mathematical equivalence) or the
GSM8K one (`checker="gsm8k"`: the last number in the response); the choice is recorded in each
item's `meta["checker"]`, which `check` follows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from qalign.tasks.base import Check, TaskItem

StrPath = str | os.PathLike[str]

_TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


# --- shared helpers -------------------------------------------------------------------------


def resolve_file(path: StrPath, candidates: Sequence[str], what: str) -> Path:
    """`path` itself when it is a file; else the first of `candidates` inside the folder `path`.

    Raises FileNotFoundError naming what was looked for.
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in candidates:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(
            f"{what}: no {' or '.join(candidates)} in the folder {str(p)!r}; point `path` at the "
            "data file or at the folder holding it"
        )
    raise FileNotFoundError(f"{what}: {str(p)!r} does not exist")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON Lines: one object per non-blank line."""
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {lineno} is not a JSON object")
            out.append(obj)
    return out


def read_json(path: Path) -> Any:
    with path.open(encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (an array of objects, or JSON Lines), .csv, .tsv or .parquet file.

    CSV/TSV cells are strings; a UTF-8 byte-order mark is skipped.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            data = read_json(path)
        except ValueError:
            return read_jsonl(path)  # JSON Lines saved as .json
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON array of objects")
        return data
    if suffix in (".csv", ".tsv"):
        text = path.read_text(encoding="utf-8-sig")
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","
        )
        return [dict(r) for r in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        return rows
    raise ValueError(
        f"{path}: cannot tell the format from the suffix {suffix!r}; use one of "
        f"{', '.join(_TABLE_SUFFIXES)}"
    )


def hub_rows(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """All rows of a Hugging Face hub dataset split, as plain dicts."""
    import datasets

    ds = datasets.load_dataset(hub_id, config, split=split)
    return [dict(r) for r in ds]


def select_indices(n: int, limit: int | None, shuffle_seed: int | None) -> list[int]:
    """Which rows to use, in order: all `n` (optionally shuffled with `shuffle_seed`), then the
    first `limit`. The same seed always gives the same order, so a smaller limit gives a prefix."""
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, not {limit!r}")
    order = list(range(n))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return order if limit is None else order[:limit]


def item_rng(seed: int, namespace: str, key: str) -> random.Random:
    """A random generator that depends only on (seed, namespace, key): the same item gets the
    same draws whatever else is loaded, in whatever order."""
    digest = hashlib.sha256(f"{namespace}\x00{seed}\x00{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def no_subset(task: str, subset: object) -> None:
    if subset is not None:
        raise ValueError(f"task {task!r} has no subsets (got subset={subset!r})")


def jsonable(v: Any) -> Any:
    """`v` as JSON-serialisable data (unknown types become strings)."""
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return str(v)


def user_turn(content: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*msgs, {"role": "user", "content": content}]


# --- the custom task ------------------------------------------------------------------------


class CustomTask:
    """A local table with a column mapping.

    Args:
        prompt_field: the column holding the question / instruction.
        answer_field: the column holding the reference answer, or None (no reference).
        system_prompt: an optional system turn before the user turn.
        template: an optional user-turn template containing `{prompt}`.
        checker: how `check` judges a response: "math" (MATH-style `\\boxed{}` answers) or
            "gsm8k" (the last number).
    """

    name = "custom"

    def __init__(
        self,
        prompt_field: str = "question",
        answer_field: str | None = "answer",
        system_prompt: str | None = None,
        template: str | None = None,
        checker: Literal["math", "gsm8k"] = "math",
    ) -> None:
        if template is not None and "{prompt}" not in template:
            raise ValueError(f"custom task: template {template!r} has no {{prompt}} placeholder")
        if checker not in ("math", "gsm8k"):
            raise ValueError(f"custom task: checker must be 'math' or 'gsm8k', not {checker!r}")
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.system_prompt = system_prompt
        self.template = template
        self.checker = checker

    def load(
        self,
        path: StrPath | None,
        *,
        subset: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> list[TaskItem]:
        """Items of the file at `path` (`split` is not used: a file is one split)."""
        no_subset(self.name, subset)
        if path is None:
            raise ValueError(
                "the custom task needs `path`: a .jsonl, .json, .csv, .tsv or .parquet file"
            )
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"custom task: {str(file)!r} is not a file")
        rows = read_records(file)
        if not rows:
            raise ValueError(f"custom task: {file} has no rows")
        wanted = [f for f in (self.prompt_field, self.answer_field) if f is not None]
        for i, row in enumerate(rows):
            missing = [f for f in wanted if f not in row]
            if missing:
                raise ValueError(
                    f"custom task: {file} row {i} has no column(s) "
                    f"{', '.join(map(repr, missing))}; its columns are "
                    f"{', '.join(map(repr, row))} (set prompt_field / answer_field)"
                )
        items = []
        for src in select_indices(len(rows), limit, shuffle_seed):
            row = rows[src]
            prompt = row[self.prompt_field]
            if prompt is None:
                raise ValueError(
                    f"custom task: {file} row {src} has an empty {self.prompt_field!r}"
                )
            text = str(prompt)
            content = text if self.template is None else self.template.replace("{prompt}", text)
            ref = row[self.answer_field] if self.answer_field is not None else None
            items.append(
                TaskItem(
                    messages=user_turn(content, self.system_prompt),
                    reference=None if ref is None or ref == "" else str(ref),
                    meta={"source_index": src, "checker": self.checker, "row": jsonable(row)},
                )
            )
        return items

    def check(self, response: str, item: TaskItem) -> Check:
        from qalign.tasks.checkers import check_gsm8k, check_math

        if item.reference is None:
            raise ValueError("custom task: this item has no reference answer to check against")
        # The item records its checker, so a task rebuilt without options (get_task("custom"))
        # still judges it the way it was configured at load time.
        if item.meta.get("checker", self.checker) == "gsm8k":
            return check_gsm8k(response, item.reference)
        return check_math(response, item.reference)
