"""No import cycles inside ``medvl``: every ``import`` counts, at module level, inside functions
and under ``TYPE_CHECKING`` alike, because a cycle hidden in a function still couples the
modules (and breaks as soon as someone hoists the import)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "medvl"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """``medvl.x.y`` -> its file, for every module of the package (``__init__`` as the package)."""
    out = {}
    for path in (root / PACKAGE).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (``from a import b`` counts as
    ``a.b`` when ``b`` is a module, else as ``a``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join([*pkg, *([base] if base else [])])
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = module_names(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """The scanner itself: a circle closed by an import inside a function, and one closed by a
    relative ``from . import``, are both reported."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from medvl import b\n")
    (pkg / "b.py").write_text("def f():\n    from medvl.a import x\n")
    (pkg / "sub" / "c.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("import medvl.sub.c\n")
    (pkg / "e.py").write_text("import medvl.a\n")  # imports into a cycle, is not part of one
    assert sorted(cycles(import_graph(tmp_path))) == [["medvl.a", "medvl.b"], ["medvl.sub.c", "medvl.sub.d"]]
