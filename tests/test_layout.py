"""The code layout: no import cycles among selfcog's modules, and the leaf modules load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "selfcog"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under `package` (a package is its __init__.py)."""
    names = {}
    for file in package.rglob("*.py"):
        parts = file.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return names


def type_checking_only(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: top-level ones, also inside module-level if/try blocks,
    never inside functions or classes or `if TYPE_CHECKING:`."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)) and not type_checking_only(node):
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending += getattr(node, field, [])
        elif isinstance(node, ast.ExceptHandler):
            pending += node.body
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at import time (a module also imports its parent packages)."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        is_package = file.name == "__init__.py"
        edges = set()
        for node in module_level_imports(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's own package upward
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            edges |= {t for t in targets if t in modules}
        parents = name.split(".")
        edges |= {".".join(parents[:i]) for i in range(1, len(parents))}
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_selfcog_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "selfcog.recipes.sft" in graph and "selfcog.engine.loss" in graph["selfcog.engine.trainer"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("import os\n\ntry:\n    from pkg import c\nexcept ImportError:\n    pass\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n"
                                  "def late():\n    import pkg.b\nfrom . import a\n")
    (package / "d.py").write_text("import pkg.c\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


@pytest.mark.parametrize("module", ["selfcog.config", "selfcog.paths", "selfcog.xtuner", "selfcog.cli"])
def test_leaf_modules_import_without_torch(module):
    """`python -X importtime -c "import MODULE"` lists every module the import loads; torch must not be one."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                          text=True, check=True, cwd=PACKAGE.parent)
    loaded = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert module in loaded
    assert [name for name in loaded if name == "torch" or name.startswith("torch.")] == []
