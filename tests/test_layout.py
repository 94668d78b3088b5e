"""Architecture rules: the method library stays pure, only storage/mlflow/ talks to MLflow, the
promotion rule needs no store; configs reject unknown keys by name."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pogdiff.config import ConfigError, RetrainConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"prefect", "mlflow", "lancedb"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


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
    # prefect.yaml's deployments retrain with the demo's recipe and evaluation: the two must not drift
    deployed = parse_config(yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["retrain_config"])
    assert (deployed.train, deployed.evaluate, deployed.index) == (cfg.train, cfg.evaluate, cfg.index)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
