"""prefect.yaml: every deployment's entrypoint imports and its parameters validate against the flow."""

import importlib
from pathlib import Path

import yaml
from prefect.flows import Flow

ROOT = Path(__file__).resolve().parents[2]


def test_deployments_entrypoints_and_parameters():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        path, name = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow), dep["name"]
        # raises on an unknown parameter or a config that does not validate
        flow.validate_parameters(dep.get("parameters", {}))
        if "schedule" in dep:
            assert dep.get("concurrency_limit") == 1, "scheduled retrains must never overlap"
