"""The package's modules import downward only: no import cycle (imports inside functions included, so a cycle cannot
hide in one), no private name imported from another module, and every module imports on its own.

Layers, lowest first: shared utilities (tuner_utils, config, hypernet, generator, quantization, data, base_models,
export, plotting) -> the methods (methods/) -> the public entry points (mapping) -> checkpoints, the Trainer
integration, the training loop -> experiments -> the CLI.
"""

import ast
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")
PACKAGE = "hyperadalora"


def modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    found = {}
    root = os.path.join(SRC, PACKAGE)
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), SRC)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = os.path.join(folder, name)
    return found


def imports_of(module: str, path: str, known: dict) -> list:
    """[(imported module of the package, imported name or None, line)] for every import statement of ``path``."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in known else (target, alias.name, node.lineno))
    return out


def graph() -> dict:
    known = modules()
    edges = {}
    for module, path in known.items():
        edges[module] = {}
        for target, _, line in imports_of(module, path, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target != module:
                edges[module].setdefault(target, line)
    return edges


def find_cycle(edges: dict):
    """One import cycle as [m0, m1, ..., m0], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if state.get(n) is None:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle_and_passes_a_tree():  # the checker itself
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}}) is None


def test_no_import_cycle():
    edges = graph()
    cycle = find_cycle(edges)
    if cycle:
        where = " -> ".join(f"{a} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:]))
        pytest.fail(f"Import cycle: {where} -> {cycle[-1]}. Move the shared code to a lower module.")


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [f"{m}: {name} from {target} (line {line})" for m, path in known.items()
               for target, name, line in imports_of(m, path, known)
               if name and name.startswith("_") and not name.startswith("__")]
    assert not private, "Private names imported across modules (make them public or move them):\n" + "\n".join(private)


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no module of the package is loaded yet (an order-dependent
    cycle would fail here with a partially initialised module)."""
    names = sorted(m for m in modules() if not m.endswith(".__main__"))  # __main__ runs the CLI
    code = ("import importlib, sys, traceback\n"
            f"failed = []\nfor name in {names!r}:\n"
            f"    for m in [m for m in sys.modules if m == {PACKAGE!r} or m.startswith({PACKAGE!r} + '.')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as e:\n        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"Modules that fail to import first:\n{proc.stdout}{proc.stderr[-2000:]}"
