"""The code's layout rules, checked on the source with ``ast``: no module of ``ltt_exit/`` or ``benchmarks/``
imports another module's private names, no import loop among them (imports inside functions and under
``TYPE_CHECKING`` count: a loop broken by a late import is still a loop), and no file of ``ltt_exit/`` much
over 600 lines unless its docstring says why it reads best whole.

``benchmarks/`` scripts run with their own folder on ``sys.path``, so they import each other as top-level
modules (``from _common import ...``).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE_LIMIT = 650  # "about 600": a file past this must say at its top why it is one piece
WHOLE_MARK = "reads best whole"


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for ltt_exit (as a package) and benchmarks (as top-level scripts)."""
    modules = {}
    for path in sorted((ROOT / "ltt_exit").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        parts = list(path.relative_to(ROOT / "benchmarks").with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((_absolute(module, node), [alias.name for alias in node.names], node.lineno))
    return found


def _edges(module: str) -> set[str]:
    """The project modules ``module`` imports: a name that is a submodule counts as that submodule."""
    targets = set()
    for imported, names, _ in _imports(module):
        submodules = [f"{imported}.{name}" for name in names if f"{imported}.{name}" in MODULES]
        targets.update(submodules)
        if imported in MODULES and len(submodules) < max(len(names), 1):
            targets.add(imported)
    targets.discard(module)
    return targets


def _private_imports(module: str) -> list[str]:
    bad = []
    for imported, names, line in _imports(module):
        if imported not in MODULES:
            continue  # third-party internals are the library's business (and rare)
        for name in names:
            private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
            if private and f"{imported}.{name}" not in MODULES:  # a private module may be imported whole
                bad.append(f"{module}:{line} imports {name} from {imported}")
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_module_imports_another_modules_private_names():
    bad = [line for module in MODULES for line in _private_imports(module)]
    assert not bad, "cross-module private imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {module: _edges(module) for module in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("ltt_exit")))
def test_package_files_stay_small_or_say_why(module):
    path = MODULES[module]
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    if lines <= LINE_LIMIT:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert WHOLE_MARK in docstring, (
        f"{path.relative_to(ROOT)} has {lines} lines: split it by concept, or say at its top why it "
        f"{WHOLE_MARK}"
    )


# ---- the checks themselves, on small made-up trees (so that a broken checker cannot pass silently) ----
def test_cycle_finder_sees_a_loop_through_a_late_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_checks_see_the_loop_and_the_private_import_this_refactor_removed(monkeypatch, tmp_path):
    """decoder.py <-> grid.py as they were: grid took ``_RowRecord`` from decoder inside a function."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "decoder.py").write_text("from .grid import decode_grid\n")
    (package / "grid.py").write_text("def decode_grid():\n    from .decoder import _RowRecord\n")
    fake = {"pkg": package / "__init__.py", "pkg.decoder": package / "decoder.py", "pkg.grid": package / "grid.py"}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert _private_imports("pkg.grid") == ["pkg.grid:2 imports _RowRecord from pkg.decoder"]
    assert _cycles({m: _edges(m) for m in fake}) == [["pkg.decoder", "pkg.grid"]]
