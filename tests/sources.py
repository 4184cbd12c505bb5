"""Parsing the project's own source files for the tests that check its structure."""

from __future__ import annotations

import ast
import gc
from pathlib import Path


def parse_source(path: Path) -> ast.Module:
    """The syntax tree of `path`, parsed with the garbage collector paused.

    CPython 3.11 keeps one AST-construction depth counter per interpreter (gh-106905): a
    collection inside `ast.parse` that finalises a leaked pooled connection logs a traceback,
    whose formatting calls `ast.parse` again, and the outer parse fails with "AST constructor
    recursion depth mismatch" (seen once in CI).
    """
    source = path.read_text()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, str(path))
    finally:
        if enabled:
            gc.enable()
