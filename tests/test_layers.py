"""The layer rule, checked on the source: arrows run users → metrics → simulator and never back, metrics' stage
folders run truth → analysis → report → plugin, and no module imports itself around a circle.

Every import counts, a lazy one inside a function too (a lazy import is still an arrow). Read with `ast` from
the files the wheel ships, so the check holds for what users install.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# Lowest first: a module may import its own layer and the layers above it in this list, never one below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("stopstorm.distributions",),
    ("stopstorm.simulator",),
    ("stopstorm.metrics.record", "stopstorm.metrics.figures", "stopstorm.metrics.redact"),
    ("stopstorm.metrics.truth",),
    ("stopstorm.metrics.analysis",),
    ("stopstorm.metrics.report",),
    ("stopstorm.metrics.plugin",),
    ("stopstorm.users",),
    ("stopstorm",),  # the entry points: cli, scenarios, the locustfiles
)
# The client talks to the server only over HTTP: it may not reach into the simulator's code.
FORBIDDEN = {("stopstorm.users", "stopstorm.simulator")}
FOLDERS = {"stopstorm": ROOT / "stopstorm", "stopstorm.users": ROOT / "users",
           "stopstorm.metrics": ROOT / "metrics", "stopstorm.simulator": ROOT / "simulator"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        files = folder.glob("*.py") if package == "stopstorm" else folder.rglob("*.py")
        for f in files:
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The stopstorm modules `name` imports (resolved to modules, not the names inside them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module; `from pkg import name` the package's own code
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("stopstorm"):
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    """The layer of a module: its most specific prefix wins (stopstorm.metrics.truth over stopstorm)."""
    matches = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
               if name == p or name.startswith(p + ".")]
    return max(matches)[1]


def test_the_tree_was_found() -> None:
    assert {"stopstorm.users.core", "stopstorm.metrics.plugin.hooks", "stopstorm.simulator.engine",
            "stopstorm.cli", "stopstorm.locustfile"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_arrow_runs_back(name: str) -> None:
    here = _layer(name)
    back = sorted(t for t in GRAPH[name] if _layer(t) > here)
    assert not back, f"{name} (layer {LAYERS[here][0]}) imports {back}, which sit above it"
    for src, dst in FORBIDDEN:
        if name.startswith(src):
            bad = sorted(t for t in GRAPH[name] if t.startswith(dst))
            assert not bad, f"{name} imports {bad}: {src} must not reach into {dst}"


def test_no_module_imports_itself_around_a_circle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(GRAPH.get(n, ())):
            if state.get(m) == 1:
                cycle = [*path[path.index(m):], m]
                raise AssertionError("import circle: " + " → ".join(cycle))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
