"""The package's house rules, checked on the source with an AST walk (no imports run):

* no module imports a private name (``_x``) of another project module, neither with
  ``from m import _x`` nor as ``m._x`` on an imported module;
* the project's imports, at module level and inside functions alike, form no cycle;
* the sub-packages exist, and nothing imports a top-level module that no longer exists.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> dotted package it installs as (pyproject's package-dir mapping)
SOURCES = {"asyncdni": "asyncdni", "launch": "asyncdni.launch", "workers": "asyncdni.workers"}
SUBPACKAGES = ("numerics", "wire", "engine", "lab", "bench", "torch", "launch", "workers")


def project_modules() -> dict[str, Path]:
    out = {}
    for folder, dotted in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([dotted, *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path]):
    """(imported project module, imported names or None, the alias it is bound to, line) per import."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(path) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    yield a.name, None, (a.asname or a.name.split(".")[0]), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src not in modules:
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in modules:              # a submodule: an import of that module
                    yield sub, None, a.asname or a.name, node.lineno
                else:
                    yield src, a.name, a.asname or a.name, node.lineno


def test_subpackages_exist():
    modules = project_modules()
    for sub in SUBPACKAGES:
        assert f"asyncdni.{sub}" in modules, f"asyncdni.{sub} is missing"
    flat = [m for m in modules if m.count(".") == 1 and not _is_package(modules[m])]
    # the top floor holds only what every room uses
    assert set(flat) <= {"asyncdni.cli", "asyncdni.config", "asyncdni.schedules", "asyncdni.report",
                         "asyncdni.files", "asyncdni.run", "asyncdni.nodes", "asyncdni.api", "asyncdni.__main__"}, flat


def test_no_private_name_crosses_a_module():
    modules = project_modules()
    problems = []
    for name, path in modules.items():
        aliases = {}
        for src, imported, alias, line in imports_of(name, path, modules):
            if imported is None:
                aliases[alias] = src
            elif imported.startswith("_") and not imported.startswith("__") and src != name:
                problems.append(f"{path.relative_to(ROOT)}:{line}: from {src} import {imported}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr} "
                                f"({aliases[node.value.id]})")
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or self-loops."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        deps = {src for src, *_ in imports_of(name, path, modules)}
        # importing a package runs its __init__, not its siblings; a module does not depend on
        # the package it lives in for this rule
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def test_imports_have_no_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a made-up graph with a circle is caught."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_numerics_never_import_the_wire():
    """Numerics are pure: nothing under asyncdni.numerics or asyncdni.torch imports zmq or the wire."""
    modules = project_modules()
    for name, path in modules.items():
        if not name.startswith(("asyncdni.numerics", "asyncdni.torch")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                assert not m.startswith(("zmq", "asyncdni.wire", "asyncdni.engine")), f"{name} imports {m}"


def test_launcher_registry():
    """Launchers are found by name; the configuration's choices come from the registry, and an
    unknown name is one clear error."""
    import pytest

    from asyncdni import config
    from asyncdni.launch import registry
    from asyncdni.launch.base import LaunchError, Launcher
    assert {"local", "agents", "ray"} <= set(registry.names())
    assert config.LAUNCHERS == registry.names()
    local = registry.launcher_class("local")
    assert issubclass(local, Launcher) and local.__name__ == "LocalLauncher"
    with pytest.raises(LaunchError, match="unknown launcher 'nope'"):
        registry.launcher_class("nope")
