"""The package's import graph keeps the rooms' arrows (ARCHITECTURE.md): no cycle, and each room
imports only the rooms below it. Every module is parsed with `ast`, so imports inside functions
(the lazy ones) count as much as those at the top."""

from __future__ import annotations

import ast
import os
import sys

import pytest

PACKAGE = "mm_teamlora"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# root-level modules with no room above them: they import only each other (and outside packages)
FOUNDATION = {"files", "constants", "padding", "tiny_tokenizer"}
# room -> the package rooms it may import (its own always allowed); None: any room but `cli`
ALLOWED = {
    "": set(),  # mm_teamlora/__init__.py
    **{name: FOUNDATION for name in FOUNDATION},
    "adapters": {"files", "constants"},
    "model": FOUNDATION | {"adapters"},
    "data": FOUNDATION,
    "eval": FOUNDATION | {"adapters", "model", "data"},
    "train": None,
    "demo": None,  # the main job's recipe, on top of every room
    "compare": None,  # `mm-teamlora compare`'s recipe, on top of every room (and of demo's data step)
    "cli": None,
}
# the adapters room knows nothing of transformers, images, datasets or DeepSpeed
ADAPTERS_OUTSIDE = {"torch", "safetensors"}


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the package."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = [PACKAGE, *os.path.relpath(path, ROOT)[:-3].split(os.sep)]
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
    """Every module `module` imports: package modules by full name, others by top-level name."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(_target(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else _target(base))
    return out


def _target(name: str) -> str:
    if name.split(".")[0] != PACKAGE:
        return name.split(".")[0]
    while name not in MODULES and "." in name:  # `import mm_teamlora.x.attr` -> mm_teamlora.x
        name = name.rpartition(".")[0]
    return name


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of `graph` of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v] & graph.keys():
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_graph_is_read():
    assert f"{PACKAGE}.data.prepare" in MODULES and f"{PACKAGE}.eval.routing" in MODULES
    assert f"{PACKAGE}.files" in GRAPH[f"{PACKAGE}.data.mixture"]
    assert "torch" in GRAPH[f"{PACKAGE}.adapters.lora"]
    # a lazy import inside a function counts
    assert f"{PACKAGE}.model.zoo" in GRAPH[f"{PACKAGE}.model.builder"]
    assert _cycles({"a": {"b"}, "b": {"c", "x"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}) == [["a", "b", "c"], ["d"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_every_module_belongs_to_a_known_room():
    unknown = sorted(m for m in MODULES if _room(m) not in ALLOWED)
    assert unknown == [], "add the new room or root-level module to ALLOWED"


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_the_rooms_below(room):
    allowed = ALLOWED[room]
    wrong = []
    for module, targets in GRAPH.items():
        if _room(module) != room:
            continue
        for target in sorted(targets & MODULES.keys()):
            other = _room(target)
            if other == "cli" or (other != room and allowed is not None and other not in allowed):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_adapters_use_only_torch_safetensors_and_the_standard_library():
    wrong = [f"{module} -> {target}" for module, targets in GRAPH.items() if _room(module) == "adapters"
             for target in sorted(targets - MODULES.keys())
             if target not in ADAPTERS_OUTSIDE and target not in sys.stdlib_module_names]
    assert wrong == []
