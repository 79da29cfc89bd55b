"""The package's import graph: no module of tasks/ or common/ imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: str, known: set[str]) -> set[str]:
    """The package's modules this file imports, at the top or inside a function alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known and name.split(".")[0] == package}
    return found


@pytest.mark.parametrize("package", ["tasks", "common"])
def test_no_import_cycle(package: str) -> None:
    files = {module_name(path): path for path in (ROOT / package).rglob("*.py")}
    graph = {name: imports_of(path, package, set(files)) - {name} for name, path in files.items()}
    # `python -m tasks` (tasks/__main__.py) is the entry point, not a module anything imports.
    graph.pop(f"{package}.__main__", None)

    def cycle_from(start: str) -> list[str] | None:
        stack, path = [(start, iter(sorted(graph.get(start, ()))))], [start]
        while stack:
            _, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
            elif child == start:
                return [*path, start]
            elif child not in path:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
        return None

    cycles = [cycle for name in sorted(graph) if (cycle := cycle_from(name))]
    assert not cycles, cycles[0]
