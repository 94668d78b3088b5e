"""prefect.yaml and deploy/gpu/prefect.yaml: every deployment's entrypoint imports and its parameters
validate against the flow; `pogdiff serve` builds its own deployments; the GPU deployment's job, rendered
by Prefect's own templating from the shipped Kubernetes job template, runs the pinned image on a GPU."""

import asyncio
import json
from typing import Any

import pytest
import yaml
from prefect.deployments.steps.core import StepExecutionError, run_steps
from prefect.flows import Flow
from prefect.server.schemas.actions import validate_base_job_template
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.schema_tools import validate
from prefect.utilities.templating import apply_values
from prefect.workers.base import BaseJobConfiguration

from flows.cli_serve import overrides
from flows.deployments import GPU_PREFECT_YAML, load_specs, to_runner_deployment
from tasks.track import EVALUATE_ENTRYPOINT, RETRAIN_ENTRYPOINT

GPU_DIR = GPU_PREFECT_YAML.parent
IMAGE = "registry.example.org/pogdiff:1a2b3c4"


def test_deployments_entrypoints_and_parameters():
    specs, gpu = load_specs(), load_specs(GPU_PREFECT_YAML)
    assert {s.name for s in specs} == {"retrain-nightly", "ingest-hourly", "evaluate-champion"}
    assert [s.name for s in gpu] == ["retrain-gpu"]
    for spec in specs + gpu:
        flow = spec.flow()
        assert isinstance(flow, Flow), spec.name
        # raises on an unknown parameter or a config that does not validate
        flow.validate_parameters(spec.parameters)
        if spec.schedule:
            assert spec.concurrency_limit == 1, f"{spec.name}: scheduled runs must never overlap"
    # `prefect deploy --all` on a machine with only the process pool: prefect.yaml names no other pool
    assert {s.work_pool for s in specs} == {"local"} and gpu[0].work_pool == "gpu"
    # the runs' MLflow "Source" names the deployments' entrypoints
    assert {RETRAIN_ENTRYPOINT, EVALUATE_ENTRYPOINT} <= {s.entrypoint for s in specs}


def test_a_bad_parameter_in_a_deployment_is_rejected():
    spec = next(s for s in load_specs() if s.name == "retrain-nightly")
    bad = {**spec.parameters, "config": {"train": {"stepz": 3}}}
    try:
        spec.flow().validate_parameters(bad)
    except Exception as err:  # Prefect's ParameterTypeError wraps pydantic's message
        assert "stepz" in str(err)
    else:
        raise AssertionError("an unknown config key passed Prefect's parameter validation")


def test_serve_builds_its_own_scheduled_deployments_with_overrides(tmp_path):
    specs = {s.name: s for s in load_specs()}
    retrain = specs["retrain-nightly"]
    dep = to_runner_deployment(retrain, overrides(retrain.flow(), "/some/source", "/some/tiny.yaml"))
    assert dep.name == "retrain-nightly-served"  # never the name `prefect deploy` gives the work-pool deployment
    assert dep.parameters == {"source": "/some/source", "config": "/some/tiny.yaml"}
    assert dep.concurrency_limit == 1 and dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
    ingest = specs["ingest-hourly"]
    dep = to_runner_deployment(ingest, overrides(ingest.flow(), None, None))
    assert dep.name == "ingest-hourly-served" and dep.parameters == ingest.parameters == {"source": "demo-catalogue", "config": "demo"}
    assert dep.schedules[0].schedule.interval.total_seconds() == 3600
    evaluate = specs["evaluate-champion"]
    assert to_runner_deployment(evaluate, overrides(evaluate.flow(), "/ignored", "/c.yaml")).parameters == {"model": "champion", "config": "/c.yaml"}


class KubernetesJobConfiguration(BaseJobConfiguration):
    """The fields the Kubernetes worker's job configuration adds to the base one (prefect-kubernetes is
    not a dependency here; Prefect's core templating renders the template the same way)."""

    namespace: str
    job_manifest: dict[str, Any]
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int
    stream_output: bool


def test_gpu_job_runs_the_pinned_image_on_a_gpu(monkeypatch):
    spec = yaml.safe_load(GPU_PREFECT_YAML.read_text())
    template = json.loads((GPU_DIR / "base-job-template.json").read_text())
    validate_base_job_template(template)  # the server's check: every placeholder is a declared variable
    (deployment,) = spec["deployments"]
    quiet = lambda *args, **kwargs: None  # noqa: E731
    # Nothing listens there: the steps and the template name no block or variable, so nothing is looked up.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        monkeypatch.delenv("POGDIFF_IMAGE", raising=False)
        with pytest.raises(StepExecutionError) as err:  # `prefect deploy` stops at its build step
            asyncio.run(run_steps(spec["build"], {}, print_function=quiet))
        assert "POGDIFF_IMAGE is not set: set it to the pipeline image built from deploy/gpu/Dockerfile" in str(err.value.__cause__)

        monkeypatch.setenv("POGDIFF_IMAGE", IMAGE)
        outputs = asyncio.run(run_steps(spec["build"], {}, print_function=quiet))
        job_variables = apply_values(deployment["work_pool"]["job_variables"], outputs)  # as `prefect deploy` templates them
        validate(job_variables, template["variables"], raise_on_error=True)  # as the server checks a run's job variables
        job = asyncio.run(KubernetesJobConfiguration.from_template_and_values(template, job_variables))

    pod = job.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["env"]["POGDIFF_SETTINGS_FILE"] == "/etc/pogdiff/settings.yaml" and container["env"]["HF_HUB_OFFLINE"] == "1"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/etc/pogdiff"]["configMap"]["name"] == "pogdiff-settings"
    assert mounts["/data"]["persistentVolumeClaim"]["claimName"] == "pogdiff-data"
    assert deployment["parameters"]["source"].startswith("/data/")
    assert deployment["parameters"]["config"]["train"]["base_model"].startswith("/data/")
    # the code is baked into the image where the pull step runs the flow from
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/pogdiff"}}]
    assert "WORKDIR /opt/pogdiff" in (GPU_DIR / "Dockerfile").read_text().splitlines()
