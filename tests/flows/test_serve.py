"""`pogdiff serve` against the session's real `prefect server start` process: runs triggered through the API
complete, leave their report artifact, and never train at the same time (concurrency_limit 1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from localserver import wait_for

from pogdiff.demo import catalogue
from pogdiff.pipelines.pixel import PixelDiffusionPipeline

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

ROOT = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_spec, prefect_api):
    root = tmp_path_factory.mktemp("serve")
    source = root / "source"
    catalogue.generate_longtail(source, seed=5, size=16, max_count=6, alpha=1.0, min_count=1)
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(root / "base")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "index": {"k": 3},
        "train": {"base_model": str(root / "base"), "steps": 3, "batch_size": 8},
        "evaluate": {"min_images_per_individual": 1, "max_images_per_individual": 2, "num_inference_steps": 2, "buckets": {"many_above": 4, "few_below": 2}},
        "registry": {"experiment": "served", "model_name": "served-model"},
    }))
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # the runner looks for due runs every second, not every 10
    logs = root / "logs"
    logs.mkdir()
    procs = []
    try:
        serve_env = {**env, "POGDIFF_HOME": str(root / "home"), "POGDIFF_PREFECT_API_URL": prefect_api, "PREFECT_API_URL": prefect_api}
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--deployment", "retrain-nightly",
                                  "--source", str(source), "--config", str(config)],
                                 cwd=ROOT, env=serve_env, stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT)
        procs.append(serve)
        yield prefect_api, procs, logs
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_served_retrain_runs_complete_one_at_a_time(served):
    api, procs, logs = served
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        def deployment():
            try:
                return client.read_deployment_by_name("retrain/retrain-nightly")
            except Exception:  # not registered yet (ObjectNotFound) while `serve` starts
                return None

        dep = wait_for(deployment, 180, "the served deployment", procs, interval=1)
        assert dep.global_concurrency_limit.limit == 1 and dep.schedules
        runs = [client.create_flow_run_from_deployment(dep.id) for _ in range(2)]

        def finished():
            states = [client.read_flow_run(r.id).state for r in runs]
            return states if all(s.type.value in FINAL for s in states) else None

        try:
            states = wait_for(finished, 540, "both flow runs to finish", procs, interval=1)
        except AssertionError:
            print((logs / "serve.log").read_text()[-5000:])
            raise
        assert [s.type.value for s in states] == ["COMPLETED", "COMPLETED"], (logs / "serve.log").read_text()[-5000:]

        spans = []
        for r in runs:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
            train = [t for t in tasks if t.name.startswith("train-")]
            assert len(train) == 1 and train[0].state.type.value == "COMPLETED"
            spans.append((train[0].start_time, train[0].end_time))
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
            report = [a for a in artifacts if a.key == "retrain-report"]
            assert report and "| overall | grecall ↑ |" in report[0].data
        (a_start, a_end), (b_start, b_end) = sorted(spans)
        assert a_end <= b_start, f"two trainings overlapped: {spans}"
        # both were picked up together; the deployment's limit made one of them wait for the other
        history = [[s.name for s in client.read_flow_run_states(r.id)] for r in runs]
        assert any("AwaitingConcurrencySlot" in h for h in history), history
