"""The code's shape, checked: no import cycle between the library's files (type-only imports included, a package
counted with what its ``__init__`` imports), no library file outside ``glue/`` over 250 lines, no function over 60."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "lightning_deltasam"
MAX_FILE_LINES = 250
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted name -> file of every library module (a package by its ``__init__``)."""
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules ``name`` imports: every ``import``/``from ... import`` at any depth, the packages above
    each target (importing ``a.b.c`` runs ``a.b``'s ``__init__``), and every module of a package whose
    ``__init__`` imports its modules dynamically (``pkgutil``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    if "pkgutil" in text and path.name == "__init__.py":
        found.update(m for m in known if m.rpartition(".")[0] == name)
    parents = {".".join(t.split(".")[:k]) for t in found for k in range(2, t.count(".") + 1)}
    return {t for t in found | parents if t in known and t != name and not name.startswith(t + ".")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_library_has_no_import_cycle() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_relative_import_resolves_to_the_module() -> None:
    known = modules()
    engine = "lightning_deltasam.engine"
    assert "lightning_deltasam.config" in imports_of(engine, known[engine], known)
    assert "lightning_deltasam.ascent" in imports_of(engine, known[engine], known)  # via ascent.per_instance


@pytest.mark.parametrize("path", [p for p in modules().values() if "glue" not in p.parts], ids=lambda p: p.name)
def test_no_library_file_is_over_250_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_FILE_LINES}): split it by job"


def test_no_function_is_over_60_lines() -> None:
    long = []
    for path in [*LIBRARY.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({size} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)
