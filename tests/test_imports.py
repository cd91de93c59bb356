"""Every module of the package imports on its own, and the package's import graph has no cycle.

A cycle works until someone imports the modules in another order (then a name is missing from a half-initialised
module), and one hidden in a function-level import fails only when that function first runs. So the graph counts
module-level *and* function-level imports (only ``if TYPE_CHECKING:`` blocks, which never run, are left out); the
implicit import of a module's parent package is not an edge (Python initialises a package before its modules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every package pyproject.toml installs (its ``packages`` and ``package-dir``)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    dirs: dict[str, str] = cfg["package-dir"]
    modules: dict[str, Path] = {}
    for package in cfg["packages"]:
        parent = package
        while parent not in dirs:  # detox.serve lives in detox's directory, as serve/
            parent = parent.rpartition(".")[0]
        folder = ROOT / dirs[parent] / Path(*package[len(parent):].split(".")[1:])
        for file in sorted(folder.glob("*.py")):
            modules[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return modules


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, file: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for each import statement in ``file``, at any depth."""
    package = name if file.stem == "__init__" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def ours(target: str) -> str | None:  # the module itself, else its nearest package of ours
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            targets = []
        for target in targets:
            hit = ours(target)
            if hit is not None and hit != name:
                found.append((hit, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(file.read_text(encoding="utf-8"), str(file)))
    return found


def import_cycles(modules: dict[str, Path]) -> list[tuple[list[str], list[tuple[str, int]]]]:
    """Each strongly connected component of the import graph (modules that reach each other) with one cycle in it:
    [(module, line of its import of the next)], a shortest one through the component's first module."""
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for name, file in modules.items():
        for target, line in imports_of(name, file, modules):
            edges[name].setdefault(target, line)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:  # a shortest way back to the component's first module
        start, inside = component[0], set(component)
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w == start:
                    path = paths[v] + [start]
                    cycles.append((component, [(a, edges[a][b]) for a, b in zip(path, path[1:])]))
                    queue = []
                    break
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def test_the_package_has_no_import_cycle() -> None:
    modules = package_modules()
    cycles = import_cycles(modules)
    described = [f"{{{', '.join(group)}}}: " + " -> ".join(f"{m} ({modules[m].relative_to(ROOT)}:{line})"
                                                           for m, line in cycle) + f" -> {cycle[0][0]}"
                 for group, cycle in cycles]
    assert not cycles, ("import cycles: each group of modules that import each other, and one cycle in it (each "
                        "arrow's import is at the file:line before it):\n" + "\n".join(described))


def test_the_cycle_check_sees_function_level_imports(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("from pkg.b import x\n")
    b.write_text("import os\n\ndef f():\n    from pkg import c\n    return c\n")
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import x\n\ndef g():\n"
                 "    import pkg.a\n")
    modules = {"pkg.a": a, "pkg.b": b, "pkg.c": c}
    assert import_cycles(modules) == [(["pkg.a", "pkg.b", "pkg.c"], [("pkg.a", 1), ("pkg.b", 4), ("pkg.c", 6)])]
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    assert import_cycles(modules) == []


IMPORT_EACH = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "detox" or m.startswith("detox.")]:
        del sys.modules[loaded]  # each module starts from nothing of the package (third-party modules stay loaded)
    try:
        importlib.import_module(name)
    except BaseException as err:
        failures[name] = "".join(traceback.format_exception_only(type(err), err)).strip()
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own() -> None:
    modules = sorted(package_modules())
    assert "detox.artifacts.store" in modules and "detox.serve.app" in modules and "detox.cli.main" in modules
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(modules)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import in a fresh interpreter:\n" + "\n".join(
        f"{name}: {why}" for name, why in failures.items())
