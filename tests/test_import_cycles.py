"""No import cycles among jaxkd modules, counting every import statement wherever it sits
(module top, inside functions, under ``if TYPE_CHECKING:``): a cycle hidden in a function is
still two modules that each need the other.

The graph has one edge per import statement from the importing module to the module it names:
``import a.b``, ``from a import b`` (``a.b`` when that is a module, else ``a``) and relative
imports resolved against the importing module. Importing ``a.b`` also runs ``a/__init__.py``;
that implicit edge to the parent package is not counted, so a package ``__init__`` may import
its own submodules (the usual re-export) without that alone forming a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its source)."""
    files = module_files(root, package)

    def known(name: str) -> str | None:
        # ``import jaxkd.models.decoder.Decoder`` cannot happen, but ``from x import name`` can
        # name a function: walk up to the nearest real module.
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_package else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                         for a in node.names]
            for name in names:
                target = known(name)
                if target is not None and target != mod:
                    graph[mod].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (each one is a cycle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has ~50 nodes, recursion depth is no issue
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def cycle_path(graph: dict[str, set[str]], comp: list[str]) -> str:
    """One concrete loop through a component, for the failure message: a -> b -> a."""
    members, start = set(comp), comp[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return " -> ".join(path + [start])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # members of one component always lead back; fall back to listing them
            return " <-> ".join(comp)
        path.append(fresh[0])
        seen.add(fresh[0])


def test_no_import_cycles_among_jaxkd_modules():
    graph = import_graph(ROOT, "jaxkd")
    assert len(graph) > 30 and graph["jaxkd.models.decoder"], "the scan found no jaxkd modules"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among jaxkd modules:\n" + "\n".join(
        cycle_path(graph, c) for c in cycles)


@pytest.mark.parametrize("package", ["demo", "evals"])
def test_no_import_cycles_in_the_demo_and_evals(package):
    graph = import_graph(ROOT, package)
    assert len(graph) > 3, f"the scan found no {package} modules"
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles among {package} modules:\n" + "\n".join(
        cycle_path(graph, c) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_cycles_through_function_imports_and_relative_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/mesh.py": "def build():\n    from pkg.models.decoder import Decoder\n    return Decoder\n",
        "pkg/models/__init__.py": "from pkg.models import decoder\n",  # a package face: no cycle
        "pkg/models/decoder.py": "from pkg.models.layers import Layer\nDecoder = Layer\n",
        "pkg/models/layers.py": "from ..mesh import build\nLayer = object\n",
        "pkg/models/params.py": "def f():\n    from . import tokenizer\n",
        "pkg/models/tokenizer.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from pkg.models.params import f\n",
        "pkg/data.py": "import pkg.mesh\n",  # imports into a cycle without being part of it
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.models.layers"] == {"pkg.mesh"}
    assert graph["pkg.models.params"] == {"pkg.models.tokenizer"}
    assert find_cycles(graph) == [["pkg.mesh", "pkg.models.decoder", "pkg.models.layers"],
                                  ["pkg.models.params", "pkg.models.tokenizer"]]
    assert cycle_path(graph, ["pkg.models.params", "pkg.models.tokenizer"]) == \
        "pkg.models.params -> pkg.models.tokenizer -> pkg.models.params"


def test_checker_accepts_an_acyclic_package(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import x\n",
        "pkg/a.py": "from pkg.b import y\nx = y\n",
        "pkg/b.py": "import json\ny = 1\n",
    })
    assert find_cycles(import_graph(tmp_path, "pkg")) == []
