"""The code layout: no import cycles among selfcog's modules, the leaf modules load without torch, and every import
inside a function is of a heavy or optional library or says why it is there."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
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


@pytest.mark.parametrize("module", ["selfcog.config", "selfcog.paths", "selfcog.xtuner", "selfcog.cli",
                                    "selfcog.hardware", "selfcog.studio.jobs"])
def test_leaf_modules_import_without_torch(module):
    """`python -X importtime -c "import MODULE"` lists every module the import loads; torch must not be one."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                          text=True, check=True, cwd=PACKAGE.parent)
    loaded = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert module in loaded
    assert [name for name in loaded if name == "torch" or name.startswith("torch.")] == []


LAZY_LIBRARIES = {"torch", "transformers", "peft", "streamlit", "uvicorn", "pandas", "llama_cpp", "gguf",
                  "sentencepiece", "readline"}
"""Heavy or optional libraries a function may import where it needs them without saying why: kept out of leaf
modules and `selfcog --help`, or absent without the extra that installs them."""
def function_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside function bodies, at any depth."""
    found = []
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for statement in function.body:
                found += [node for node in ast.walk(statement) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return sorted(set(found), key=lambda node: node.lineno)


def unexplained_imports(source: str) -> list[str]:
    """`LINE: import ...` for each function-level import that neither names only LAZY_LIBRARIES nor carries a
    comment on one of its lines (the reason: torch, an import cycle, an optional extra, ...)."""
    commented = {token.start[0] for token in tokenize.generate_tokens(io.StringIO(source).readline)
                 if token.type == tokenize.COMMENT}
    found = []
    for node in function_level_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            modules = ["." if node.level else node.module or ""]
        if all(module.split(".")[0] in LAZY_LIBRARIES for module in modules):
            continue
        if commented.isdisjoint(range(node.lineno, node.end_lineno + 1)):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("relative", sorted(file.relative_to(PACKAGE).as_posix() for file in PACKAGE.rglob("*.py")))
def test_function_level_imports_say_why(relative):
    """An import inside a function hides what a module depends on: it belongs at the top unless a heavy or optional
    library is kept out of a light module, or a comment on its line says why (an import cycle, torch, ...)."""
    assert unexplained_imports((PACKAGE / relative).read_text(encoding="utf-8")) == []


def test_the_import_check_finds_an_unexplained_import():
    source = ("import os\n\n"
              "def f():\n    import torch\n    from selfcog.models import load_model  # torch\n"
              "    from selfcog.data import (\n        general,  # a cycle\n    )\n\n"
              "class C:\n    def g(self):\n        if True:\n            import json\n"
              "        from . import sibling\n        from gguf import GGUFReader\n"
              "        text = '# not a comment'; import re\n")
    assert unexplained_imports(source) == ["13: import json", "14: from . import sibling", "16: import re"]
