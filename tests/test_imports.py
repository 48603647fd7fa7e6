"""The package's import graph: no cycles among aax modules, and the stages depend one way.

The graph is read from the source with ``ast`` (nothing is imported): every ``import``
and ``from ... import`` of an aax module, at module level AND inside functions (lazy
imports count: a lazy import that closes a loop is still a loop, only a later one).
Imports under ``if TYPE_CHECKING:`` are left out, since they never run. ``from pkg import
name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``; the
package ``__init__`` a submodule import runs on the way is not counted (every package
``__init__`` of a stage imports nothing, so it cannot close a loop).

Beside the cycle check, the stages keep their order at module level: a module never
imports, when it is loaded, a module of a later stage (data -> models -> training /
annotation -> evaluation / interop -> demo / cli). Lazy imports may reach later stages
(``Ensemble.annotate`` hands over to the annotation core), as long as they close no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "aax"

STAGES: dict[str, int] = {
    "aax": 0, "aax.runtime": 0,
    "aax.data": 1,
    "aax.models": 2,
    "aax.training": 3, "aax.annotation": 3,
    "aax.evaluation": 4, "aax.interop": 4, "aax.scale": 4,
    "aax.demo": 5, "aax.cli": 5, "aax.__main__": 5,
}
"""Each top-level module or subpackage of aax and its place in the flow."""


def module_names() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that can run, and whether it runs when the module loads."""
    found = []
    stack: list[tuple[ast.AST, bool]] = [(tree, True)]
    while stack:
        node, at_load = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                stack += [(c, at_load) for c in child.orelse]
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, at_load))
            deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack.append((child, at_load and not deferred))
    return found


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    """aax module -> the aax modules it imports (``lazy``: function-level imports too)."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node, at_load in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not (at_load or lazy):
                continue
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in wanted:
                while target and target not in modules:  # an attribute path: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def stage(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in STAGES:
            return STAGES[".".join(parts[:n])]
    raise KeyError(module)


def test_the_graph_sees_the_package() -> None:
    graph = import_graph()
    assert {"aax.annotation.annotate", "aax.models.ensemble", "aax.evaluation.evaluate"} <= set(graph)
    assert "aax.models.maps" in graph["aax.annotation.annotate"]
    assert "aax.annotation.annotate" in graph["aax.models.ensemble"]  # a lazy import, counted
    assert "aax.annotation.annotate" not in import_graph(lazy=False)["aax.models.ensemble"]


def test_find_cycle_names_the_loop() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("lazy", [True, False], ids=["with lazy imports", "module level"])
def test_no_import_cycles(lazy: bool) -> None:
    cycle = find_cycle(import_graph(lazy))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_stage() -> None:
    missing = []
    for name in module_names():
        try:
            stage(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"modules with no stage in STAGES: {missing}"


def test_stages_import_one_way_at_module_level() -> None:
    backwards = sorted(f"{a} -> {b}" for a, targets in import_graph(lazy=False).items()
                       for b in targets if stage(b) > stage(a))
    assert not backwards, "module-level imports of a later stage: " + "; ".join(backwards)
