"""Run names in text tables: the grid axes that tell runs apart, never a name cut mid-value.

A run's name spells every grid axis (`model=...,beta=...,T=...,steps=...`), which makes it long
(a model name alone can take 40 characters) and alike across runs. Tables show instead one
column per axis whose value differs between the runs shown, each value in full; with a single
run (nothing differs) the full name is the one column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# (column header, key of a run's settings) in the order of a run's name
AXES = (("sweep", "sweep"), ("model", "generator_model"), ("beta", "beta"),
        ("T", "temperature"), ("steps", "steps"))  # fmt: skip


def _show(value: Any) -> str:
    if value is None:
        return "-"
    return format(value, "g") if isinstance(value, float) else str(value)


def run_columns(
    runs: Sequence[Mapping[str, Any]], name_key: str = "name"
) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of cells per run: the axes that differ, or ["run"] and full names.

    Each run is a mapping holding `name_key` and any of the `AXES` keys (missing: not shown).
    """
    cells = [[_show(r.get(key)) for _, key in AXES] for r in runs]
    differ = [
        i
        for i, (_, key) in enumerate(AXES)
        if any(key in r for r in runs) and len({c[i] for c in cells}) > 1
    ]
    if not differ:
        return ["run"], [[str(r[name_key])] for r in runs]
    return [AXES[i][0] for i in differ], [[c[i] for i in differ] for c in cells]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: int = 0) -> list[str]:
    """Lines of a plain-text table, each column as wide as its widest cell (nothing is cut).

    Args:
        right: the last `right` columns are right-aligned (numbers).
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    first_right = len(headers) - right

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i >= first_right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


__all__ = ["AXES", "run_columns", "text_table"]
