"""The package's import graph: layers point one way and no module imports itself back.

Every import statement counts, including those inside functions and under TYPE_CHECKING: a lazy
import is still a dependency, only a hidden one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.sources import parse_source

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qalign"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The qalign module `name` refers to (a module, or the package holding a name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> Iterator[str]:
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    for node in ast.walk(parse_source(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name)) is not None:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from pkg import mod` imports the submodule; `from mod import name` the module
                target = _resolve(f"{base}.{alias.name}") or _resolve(base)
                if target is not None:
                    yield target


GRAPH = {m: {t for t in _imports(m) if t != m} for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def _reaches(src_prefix: str, dst_prefix: str) -> list[tuple[str, str]]:
    return sorted(
        (m, t)
        for m, targets in GRAPH.items()
        if m.startswith(src_prefix)
        for t in targets
        if t.startswith(dst_prefix)
    )


def test_the_graph_sees_known_edges() -> None:
    """The walker itself works: a few imports we know of are found."""
    assert "qalign.steps.service" in GRAPH["qalign.scheduler.local"]
    assert "qalign.storage.repo" in GRAPH["qalign.steps.service"]
    assert "qalign.core.kernel" in GRAPH["qalign.core"]  # relative to a package's __init__


def test_no_import_cycles_anywhere_in_qalign() -> None:
    assert _cycles() == []


def test_layers_point_one_way() -> None:
    assert _reaches("qalign.scheduler", "qalign.workers") == []
    assert _reaches("qalign.steps", "qalign.scheduler") == []
    assert _reaches("qalign.steps", "qalign.workers") == []
    assert _reaches("qalign.dispatch", "qalign.steps") == []
    assert _reaches("qalign.analysis", "qalign.workers") == []
    assert _reaches("qalign.analysis", "qalign.steps.service") == []
    for lower in ("qalign.clients", "qalign.storage", "qalign.sampling"):
        for upper in ("qalign.steps", "qalign.scheduler", "qalign.workers", "qalign.dispatch"):
            assert _reaches(lower, upper) == [], (lower, upper)


def test_core_does_no_io() -> None:
    heavy = ("aiohttp", "sqlalchemy", "celery", "kombu", "redis", "psycopg", "httpx")
    for module, path in MODULES.items():
        if not module.startswith("qalign.core"):
            continue
        for node in ast.walk(parse_source(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in heavy], (module, names)
            assert not [n for n in names if n.startswith("qalign.") and "core" not in n]
