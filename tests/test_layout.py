"""Architecture rules: each layer imports only the layers below it (``LAYERS``), the method library
stays pure, only storage/mlflow/ talks to MLflow, the promotion rule needs no store, no import cycles,
short modules; configs reject unknown keys by name."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pogdiff.config import ConfigError
from tasks.config import RetrainConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
# The layer matrix: which of the project's top-level packages each one may import (its own always).
LAYERS: dict[str, set[str]] = {
    "pogdiff": set(),  # the method library: nothing of ours (and never FORBIDDEN, below)
    "storage": {"pogdiff"},
    "tasks": {"pogdiff", "storage"},
    "flows": {"pogdiff", "storage", "tasks"},
    "bench": {"pogdiff", "storage", "tasks", "flows"},
}
FORBIDDEN = {"prefect", "mlflow", "lancedb"}
PACKAGES = ("pogdiff", "storage", "tasks", "flows")
MAX_MODULE_LINES = 400


def _imports(path: Path) -> set[str]:
    """Top-level names of everything ``path`` imports, at module level or inside functions."""
    return _packages(ast.parse(path.read_text(encoding="utf-8")))


def _packages(tree: ast.AST) -> set[str]:
    return {name.split(".")[0] for name in _import_names(tree)}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _import_names(tree: ast.AST) -> set[str]:
    """Dotted names ``tree`` imports anywhere (top level or inside functions), ``from a import b`` as
    both ``a`` and ``a.b``; ``if TYPE_CHECKING:`` blocks never run, so they are skipped."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _layer_violations() -> dict[str, list[str]]:
    """Module (path) -> the packages of ours it imports that ``LAYERS`` does not allow it."""
    bad = {}
    for package, allowed in LAYERS.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no modules under {package}/"
        for f in files:
            if extra := (_imports(f) & LAYERS.keys()) - allowed - {package}:
                bad[str(f.relative_to(ROOT))] = sorted(extra)
    return bad


def test_every_module_imports_only_the_layers_below_it():
    bad = _layer_violations()
    assert not bad, f"imports across the layer matrix {LAYERS}: {bad}"


def test_layer_check_sees_function_level_imports():
    late = ast.parse("import numpy\n\ndef f():\n    from tasks.config import RetrainConfig\n    import storage.parquet\n")
    assert _packages(late) & LAYERS.keys() == {"tasks", "storage"}
    assert "tasks.config" in _imported(late, {"tasks.config": ROOT})  # the cycle check sees it too


def test_pogdiff_library_imports_no_orchestration_or_store():
    files = sorted((ROOT / "pogdiff").rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN) for f in files if _imports(f) & FORBIDDEN}
    assert not bad, f"pogdiff/ must stay pure: {bad}"


def test_pogdiff_imports_without_loading_forbidden_modules():
    code = ("import sys, pogdiff.trainer, pogdiff.evaluation, pogdiff.index, pogdiff.base; "
            "print(sorted(m for m in ('prefect', 'mlflow', 'lancedb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project modules ``tree`` imports (``_import_names``); a name inside a module counts as the module."""
    found: set[str] = set()
    for name in _import_names(tree):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for dep in sorted(graph[node]):
            if dep in path:
                return path[path.index(dep):] + [dep]
            if dep not in done and (found := visit(dep)):
                return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (found := visit(start)):
            return found
    return None


def test_project_modules_import_no_cycle():
    modules = _project_modules()
    graph = {name: _imported(ast.parse(path.read_text(encoding="utf-8")), modules) - {name} for name, path in modules.items()}
    assert "pogdiff.trainer" in graph["tasks.train"]  # the graph sees the project's own imports
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_detector_counts_function_level_imports():
    modules = {"a": ROOT, "b": ROOT}
    a = ast.parse("import b\n")
    b = ast.parse("def f():\n    from a import g\n")
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a import g\n")
    assert _cycle({"a": _imported(a, modules), "b": _imported(b, modules)}) == ["a", "b", "a"]
    assert _cycle({"a": _imported(a, modules), "b": _imported(guarded, modules)}) is None


def test_project_modules_are_short():
    files = [f for package in PACKAGES for f in sorted((ROOT / package).rglob("*.py"))]
    assert {f.relative_to(ROOT).parts[0] for f in files} == set(PACKAGES)
    long = {str(f.relative_to(ROOT)): n for f in files
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules of {'/, '.join(PACKAGES)}/ over {MAX_MODULE_LINES} lines: {long}"


def test_only_the_mlflow_package_imports_mlflow():
    files = [f for folder in ("storage", "tasks", "flows") for f in sorted((ROOT / folder).rglob("*.py"))]
    assert files
    inside = ROOT / "storage" / "mlflow"
    bad = [str(f.relative_to(ROOT)) for f in files if "mlflow" in _imports(f) and inside not in f.parents]
    assert not bad, f"only storage/mlflow/ may import mlflow: {bad}"


def test_promotion_rule_needs_no_mlflow():
    assert "mlflow" not in _imports(ROOT / "storage" / "gate.py")
    code = "import sys, storage.gate; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.pog\.lamda'"):
        parse_config({"train": {"pog": {"lamda": 2}}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"config key 'train\.steps'"):
        parse_config({"train": {"steps": "many"}})


def test_bad_literal_is_named():
    with pytest.raises(ConfigError, match=r"train\.pog\.method"):
        parse_config({"train": {"pog": {"method": "magic"}}})


def test_demo_config_loads_and_missing_file_is_one_line(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert isinstance(cfg, RetrainConfig) and cfg.train.base_model == "builtin:logos16"
    # prefect.yaml's deployments name the demo's file rather than copy it, so the two cannot drift
    deployed = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["parameters"]["config"] for d in deployed} == {"demo"}
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
