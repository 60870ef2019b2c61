"""The package's shape: only the engine package imports the engine, and no modules import each other in a loop
(counting every import)."""

from __future__ import annotations

import ast
from pathlib import Path

import autotune

ROOT = Path(autotune.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute module names an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = name.split(".") if is_package else name.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        is_package = (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        deps: set[str] = set()
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_targets(name, is_package, node))
        graph[name] = deps
    return graph


def test_only_the_engine_package_imports_llama_cpp():
    outside = {name for name, deps in _graph(module_level_only=False).items()
               if any(d == "llama_cpp" or d.startswith("llama_cpp.") for d in deps)
               and not name.startswith("autotune.engine")}
    assert outside == set()


def test_no_import_cycles_between_modules():
    """Counting every import, those inside functions and under TYPE_CHECKING too: the lower half can be read,
    tested and replaced alone."""
    graph = _graph(module_level_only=False)
    ours = set(graph)

    def edges(name: str) -> set[str]:
        out = set()
        for dep in graph[name]:
            while dep and dep not in ours:  # "autotune.engine.X" names a function of the package
                dep = dep.rpartition(".")[0]
            if dep and dep != name and not name.startswith(dep + "."):  # a module's own package is loading already
                out.add(dep)
                # importing a submodule first runs its package's __init__
                parent = dep.rpartition(".")[0]
                if parent in ours and parent != "autotune" and not name.startswith(parent):
                    out.add(parent)
        return out

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(edges(name)):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(ours):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_bundled_engine_implements_the_engine_protocol():
    from autotune.engine import Engine, bundled

    assert isinstance(bundled, Engine)
