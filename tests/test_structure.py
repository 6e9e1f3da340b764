"""The package's shape: small modules with one job each, imports that point one way.

Read with ``ast`` (nothing is imported), so the checks hold for every module, including
those a test run would not import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_curvature

PACKAGE = Path(lightning_curvature.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at run time or for type checking alike."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("lightning_curvature"):
                found.add(node.module)
                # `from package import module` imports the module too
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightning_curvature"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    names = {_name(p) for p in MODULES}
    return {name for name in found if name in names}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (package ``__init__`` edges left out), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_is_small_and_says_its_job(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"


def test_no_import_cycle_between_modules() -> None:
    # A package's __init__ re-exports its modules; those edges point down by construction.
    packages = {_name(p) for p in MODULES if p.name == "__init__.py"}
    graph = {
        _name(p): {m for m in _imports(p) if m not in packages}
        for p in MODULES
        if p.name != "__init__.py"
    }
    assert _cycle(graph) is None, _cycle(graph)


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_layers_point_down() -> None:
    """functional never imports callbacks; linalg imports no operator, model or gradients;
    distributed imports nothing of the package but the error classes."""
    for path in MODULES:
        name, imports = _name(path), _imports(path)
        if name.startswith("lightning_curvature.functional"):
            assert not {m for m in imports if ".callbacks" in m}, name
        if name.startswith("lightning_curvature.functional.linalg"):
            above = (".operator", ".model", ".gradients")
            assert not {m for m in imports if any(a in m for a in above)}, name
        if name.startswith("lightning_curvature.functional.distributed"):
            below = ("lightning_curvature.errors", "lightning_curvature.functional.distributed")
            assert all(m.startswith(below) for m in imports), name
