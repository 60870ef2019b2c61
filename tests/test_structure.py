"""The package's shape: folders in pipeline order, each layer importing only the layers under it, only the
engine package importing the engine, and no modules importing each other in a loop (counting every import).

Layers, bottom to top: vocabulary -> facts -> memory -> engine -> search -> stages -> output -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

import autotune

ROOT = Path(autotune.__file__).parent
LAYERS = ("vocabulary", "facts", "memory", "engine", "search", "stages", "output", "cli")

# Imports that still run upward (importer, imported), each a decision still to make. The test fails on any upward
# import not listed here, and on an entry here that no longer occurs (remove it once fixed).
ALLOWED_UPWARD: set[tuple[str, str]] = set()


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
    return [f"{prefix}.{a.name}" for a in node.names]  # an attribute's name resolves back to its module


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


def _ours(graph: dict[str, set[str]], name: str) -> set[str]:
    """The modules of ours that ``name`` imports: "autotune.engine.X" names a function of the package."""
    out = set()
    for dep in graph[name]:
        while dep and dep not in graph:
            dep = dep.rpartition(".")[0]
        if dep and dep != name:
            out.add(dep)
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    return -1 if len(parts) == 1 else LAYERS.index(parts[1])  # the package itself (__version__): any layer


def test_every_module_sits_in_a_layer():
    assert sorted(n for n in _graph(module_level_only=True) if "." in n and n.split(".")[1] not in LAYERS) == []


def test_each_layer_package_says_what_it_owns_and_may_import():
    for name in LAYERS[:-1]:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text())) or ""
        assert "May import" in doc or "imports nothing" in doc, name


def test_no_module_imports_a_higher_layer():
    """Counting every import, those inside functions and under TYPE_CHECKING too."""
    graph = _graph(module_level_only=False)
    upward = {(name, dep) for name in graph for dep in _ours(graph, name) if _layer(dep) > _layer(name)}
    assert sorted(upward - ALLOWED_UPWARD) == [], "a new import against the layer order"
    assert sorted(ALLOWED_UPWARD - upward) == [], "fixed: remove its allowance"


def test_only_the_engine_package_imports_llama_cpp():
    outside = {name for name, deps in _graph(module_level_only=False).items()
               if any(d == "llama_cpp" or d.startswith("llama_cpp.") for d in deps)
               and not name.startswith("autotune.engine")}
    assert outside == set()


def test_no_import_cycles_between_modules():
    """Counting every import, those inside functions and under TYPE_CHECKING too: the lower half can be read,
    tested and replaced alone. The allowed upward imports are left out (every loop between layers runs through
    an upward one; fixing those removes the loops)."""
    graph = _graph(module_level_only=False)
    ours = set(graph)

    def edges(name: str) -> set[str]:
        out = set()
        for dep in _ours(graph, name):
            if name.startswith(dep + ".") or (name, dep) in ALLOWED_UPWARD:  # its own package is loading already
                continue
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
