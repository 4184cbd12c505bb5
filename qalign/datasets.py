"""Turning a sweep's `dataset` section into prompt rows (messages + reference answer)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qalign.config import ConfigError, DatasetConfig

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a sweep, in dataset order."""

    index: int
    messages: list[dict[str, str]]
    reference: str | None
    row: dict[str, Any]


def _messages(cfg: DatasetConfig, question: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*msgs, {"role": "user", "content": question}]


def _load_rows(cfg: DatasetConfig) -> list[dict[str, Any]]:
    import datasets

    where = cfg.resolved_path()
    assert where is not None
    path = Path(where)
    try:
        if path.exists():
            builder = _FORMATS.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(
                    f"dataset.path: cannot tell the format of {path}; use .jsonl, .json, .csv or "
                    ".parquet"
                )
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(where, split=cfg.split or "test")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"dataset.path: cannot load {cfg.path!r} (split {cfg.split!r}): {exc}"
        ) from exc
    return [dict(r) for r in ds]


def _task_prompts(cfg: DatasetConfig) -> list[PromptRow]:
    from qalign.tasks import get_task

    assert cfg.task is not None
    try:
        task = get_task(cfg.task, **cfg.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"dataset.options: {exc}") from None
    try:
        items = task.load(
            cfg.resolved_path(), subset=cfg.subset, split=cfg.split, limit=cfg.limit,
            shuffle_seed=cfg.shuffle_seed,
        )  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"dataset: cannot load task {cfg.task!r} from {cfg.path!r}: {exc}"
        ) from exc
    if not items:
        raise ConfigError(f"dataset: task {cfg.task!r} gave no items")
    out = []
    for i, item in enumerate(items):
        msgs = item.messages
        if cfg.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": cfg.system_prompt}, *msgs]
        out.append(
            PromptRow(
                index=i,
                messages=msgs,
                reference=item.reference,
                row={"task": cfg.task, "meta": _jsonable(item.meta)},
            )
        )
    return out


def load_prompts(cfg: DatasetConfig) -> list[PromptRow]:
    """Prompt rows for a dataset section: deterministic order, optional seeded shuffle, limit."""
    if cfg.task is not None:
        return _task_prompts(cfg)
    if cfg.prompts is not None:
        rows: list[dict[str, Any]] = [{cfg.prompt_field: q} for q in cfg.prompts]
    else:
        rows = _load_rows(cfg)
    if not rows:
        raise ConfigError("dataset: no rows were loaded")
    missing = [k for k in (cfg.prompt_field, cfg.answer_field) if k and k not in rows[0]]
    if cfg.prompts is None and missing:
        raise ConfigError(
            f"dataset: column(s) {', '.join(missing)} not found; the rows have "
            f"{', '.join(sorted(rows[0]))} (set dataset.prompt_field / dataset.answer_field)"
        )
    order = list(range(len(rows)))
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(order)
    if cfg.limit is not None:
        order = order[: cfg.limit]
    out = []
    for i, src in enumerate(order):
        row = rows[src]
        ref = row.get(cfg.answer_field) if cfg.answer_field else None
        out.append(
            PromptRow(
                index=i,
                messages=_messages(cfg, str(row[cfg.prompt_field])),
                reference=None if ref is None else str(ref),
                row={"source_index": src, **{k: _jsonable(v) for k, v in row.items()}},
            )
        )
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)
