"""The package's layers, read from the source with ``ast`` (function-level imports included, imports under
``if TYPE_CHECKING:`` left out as they never run): no import cycles among ctxopt modules, and the benchmark
harness is imported only by itself, the training recipes and the command line.

Run as a script (``python tests/test_layers.py``) it prints every cycle and every import across a layer."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ctxopt"
BENCH = "ctxopt.bench"
MAY_IMPORT_BENCH = ("ctxopt.bench", "ctxopt.training", "ctxopt.cli")


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes anywhere in the tree (function bodies too), except the body of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        stack.extend(children)


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, dict[str, int]]:
    """module -> {ctxopt module it imports: line of the first such import}."""
    modules = module_files() if modules is None else modules

    def resolve(name: str) -> str | None:  # the longest prefix that is a module of ours
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")
                    base = base[:len(base) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                resolved = resolve(target) if target.split(".")[0] == "ctxopt" else None
                if resolved and resolved != name:
                    edges.setdefault(resolved, node.lineno)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def cycle_edges(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    members = set(component)
    return [f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items()) if b in members]


def _in(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def bench_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports of ctxopt.bench from modules outside bench/, training/ and the CLI."""
    return [f"{a} -> {b} (line {line})" for a, edges in sorted(graph.items()) if not _in(a, MAY_IMPORT_BENCH)
            for b, line in sorted(edges.items()) if _in(b, BENCH)]


def private_bench_names(modules: dict[str, Path] | None = None) -> list[str]:
    """``from ctxopt.bench... import _name`` anywhere outside bench/: private names that cross the layer."""
    modules = module_files() if modules is None else modules
    found = []
    for name, path in modules.items():
        if _in(name, BENCH):
            continue
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and "bench" in (node.module or "").split("."):
                found += [f"{name} imports {alias.name} (line {node.lineno})" for alias in node.names
                          if alias.name.startswith("_")]
    return found


# -- the checker itself, on a small package written here ----------------------------------------------------


def test_checker_finds_function_level_cycles_and_layer_crossings(tmp_path):
    root = tmp_path / "ctxopt"
    (root / "bench").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import g\n",
        "b.py": "from . import c\n",
        "c.py": "import ctxopt.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import x\n",
        "d.py": "from .bench.data import _raw\n",
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .bench import data\n",
        "bench/__init__.py": "",
        "bench/data.py": "from ..d import y\n",
    }
    for relative, text in files.items():
        (root / relative).write_text(text)
    modules = module_files(root)
    graph = import_graph(modules)
    assert graph["ctxopt.a"] == {"ctxopt.b": 2} and graph["ctxopt.b"] == {"ctxopt.c": 1}
    assert graph["ctxopt.c"] == {"ctxopt.a": 1}  # the TYPE_CHECKING import is not an edge
    assert import_cycles(graph) == [["ctxopt.a", "ctxopt.b", "ctxopt.c"], ["ctxopt.bench.data", "ctxopt.d"]]
    assert bench_imports(graph) == ["ctxopt.d -> ctxopt.bench.data (line 1)"]
    assert private_bench_names(modules) == ["ctxopt.d imports _raw (line 1)"]


# -- what must hold for ctxopt ------------------------------------------------------------------------------


def test_cli_and_bench_cli_import_each_other_in_one_direction_only():
    graph = import_graph()
    assert "ctxopt.bench.cli" in graph["ctxopt.cli"]
    assert "ctxopt.cli" not in graph["ctxopt.bench.cli"]


def test_training_and_the_library_use_no_private_bench_names():
    assert private_bench_names() == []


def test_the_library_does_not_import_the_benchmark_harness():
    # compressors/gemfilter.py imported ctxopt.bench.metrics; another session moves it (see the report).
    assert bench_imports(import_graph()) == []


def test_no_import_cycles():
    # pipeline <-> stages and compressors/refrag/cache <-> stage were being untangled by another session.
    graph = import_graph()
    assert [cycle_edges(graph, c) for c in import_cycles(graph)] == []


if __name__ == "__main__":
    graph = import_graph()
    for component in import_cycles(graph):
        print("cycle:", "; ".join(cycle_edges(graph, component)))
    for line in bench_imports(graph):
        print("bench imported from the library:", line)
    for line in private_bench_names():
        print("private bench name:", line)
