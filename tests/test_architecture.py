"""Layout contracts: drpo_core never imports distribution/serving packages; files stay readable."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANNED = {"ray", "fastapi", "grpc", "prometheus_client", "uvicorn", "starlette"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_core_never_imports_ray_or_serving_packages():
    offenders = {}
    for path in (ROOT / "drpo_core").rglob("*.py"):
        bad = imported_roots(path) & BANNED
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"drpo_core imports distribution/serving packages: {offenders}"


def test_core_does_not_import_services():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "drpo_core").rglob("*.py") if "services" in imported_roots(p)]
    assert not offenders


def test_required_layout_exists():
    for entry in ("pyproject.toml", "README.md", "services", "drpo_core", "deploy", "k8s", "tests", "Makefile", ".ci/run"):
        assert (ROOT / entry).exists(), entry


def test_core_files_stay_under_size_budget():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "drpo_core").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"split these files (>400 lines): {big}"
