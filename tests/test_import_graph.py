"""The import graph of drpo_core and services: no circles, no serving packages in the core, no baseline in a generic module.

Every import counts, at module level and inside functions (also under ``if TYPE_CHECKING``): a lazy import
defers the cost, not the dependency. A circle closed by an import inside a function still makes the two
modules one unit (neither can be read, tested or moved without the other) and turns into an ImportError
the day someone hoists the import. A factory that needs its subclasses therefore lives above them
(``models/generator_factory.py``), and shared helpers live below the modules that use them
(``services/cli/common.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("drpo_core", "services")
SERVING_PACKAGES = {"ray", "fastapi", "grpc", "prometheus_client", "uvicorn", "starlette"}
BASELINES = {f"drpo_core.algorithms.{name}" for name in ("raft", "dpo", "grpo", "draft", "weighted_drift")}
BASELINE_OBJECTIVES = {"drpo_core.training.objectives"}  # the learner glue of the baselines (docs/baselines.md)


def project_modules(root: Path, packages=PACKAGES) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package's __init__) for every .py file under ``packages``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported_names(module: str, is_package: bool, tree: ast.AST):
    """Every dotted name the module imports (``from a import b`` yields ``a.b``, which may be an attribute of ``a``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            yield from (base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.args[0].value


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module → the project modules it imports, module → the top-level outside packages it imports)."""
    modules = project_modules(root, packages)
    inner, outer = {}, {}
    for module, (path, is_package) in modules.items():
        inner[module], outer[module] = set(), set()
        for name in _imported_names(module, is_package, ast.parse(path.read_text(), filename=str(path))):
            target = name
            while target and target not in modules:  # a.b.attr → a.b; a.pkg.mod → a.pkg.mod when it is a module
                target = target.rpartition(".")[0]
            if target:
                inner[module].add(target)
            elif name.split(".")[0] not in packages:
                outer[module].add(name.split(".")[0])
        inner[module].discard(module)
    return inner, outer


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete circle (a → b → … → a) per strongly connected component with more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):  # Tarjan; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = min(component)
        paths, seen = {start: [start]}, {start}
        frontier = [start]
        while frontier:  # breadth-first inside the component: the shortest way back to start
            v = frontier.pop(0)
            for w in sorted(graph[v] & component):
                if w == start:
                    cycles.append(paths[v] + [start])
                    frontier = []
                    break
                if w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    frontier.append(w)
    return cycles


def test_drpo_core_and_services_have_no_import_circles():
    cycles = find_cycles(import_graph(ROOT)[0])
    assert not cycles, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_drpo_core_imports_no_serving_package():
    _, outer = import_graph(ROOT)
    bad = {m: sorted(outer[m] & SERVING_PACKAGES) for m in outer if m.startswith("drpo_core") and outer[m] & SERVING_PACKAGES}
    assert not bad, f"drpo_core imports Ray / serving packages (they belong in services/): {bad}"


def test_no_generic_module_imports_a_baseline():
    inner, _ = import_graph(ROOT)
    allowed = BASELINES | BASELINE_OBJECTIVES
    bad = {m: sorted(inner[m] & BASELINES) for m in inner if m not in allowed and inner[m] & BASELINES}
    assert not bad, f"generic modules import a baseline's module (move the shared part below both): {bad}"
    assert BASELINES <= set(inner), "a baseline module was renamed: update BASELINES"


def test_the_check_sees_a_circle_closed_inside_a_function(tmp_path):
    """The check itself: a factory importing its subclass lazily, the subclass importing the factory's module."""
    pkg = tmp_path / "drpo_core"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "base.py").write_text("def load():\n    from .sub import Sub\n    return Sub()\n")
    (pkg / "models" / "sub.py").write_text("from drpo_core.models.base import load\nimport ray\nclass Sub: ...\n")
    (pkg / "models" / "alone.py").write_text("from . import base\n")
    inner, outer = import_graph(tmp_path, packages=("drpo_core",))
    assert find_cycles(inner) == [["drpo_core.models.base", "drpo_core.models.sub", "drpo_core.models.base"]]
    assert inner["drpo_core.models.alone"] == {"drpo_core.models.base"}
    assert outer["drpo_core.models.sub"] == {"ray"}
