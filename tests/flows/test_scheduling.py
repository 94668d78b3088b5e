"""Both scheduling paths side by side on the session's real `prefect server start` process.

The work-pool runbook of docs/scheduling.md, its command blocks run as written by bash (only the server address
differs): `prefect work-pool create`, `prefect deploy --all` from the repository's prefect.yaml, a real
`prefect worker start --pool local` process and a run triggered with a config file reference, which
completes and registers a model version. Beside it `pogdiff serve`: its runs complete and never train at
the same time (concurrency_limit 1), and its deployments leave the work-pool ones and their schedules
alone, also after it stops.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from localserver import seed_mlflow_store, wait_for

from pogdiff.demo import folder
from pogdiff.pipelines.pixel import PixelDiffusionPipeline

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK_PAGE = ROOT / "docs" / "scheduling.md"  # the documentation page that holds the runbook
RUNBOOK_API = "http://127.0.0.1:4200/api"  # the server address the runbook's blocks use
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
WORK_POOL_DEPLOYMENTS = ("retrain/retrain-nightly", "ingest/ingest-hourly", "evaluate/evaluate-champion")


def runbook(name: str, api: str) -> str:
    """The runbook page's ``<!-- runbook: NAME -->`` block, pointed at ``api``."""
    blocks = dict(re.findall(r"<!-- runbook: (\w+) -->\n```\n(.*?)```\n<!-- /runbook -->", RUNBOOK_PAGE.read_text(), re.S))
    assert name in blocks and RUNBOOK_API in blocks[name], f"{RUNBOOK_PAGE.name} has no runbook block {name!r} on {RUNBOOK_API}"
    return blocks[name].replace(RUNBOOK_API, api)


def tiny_config(base: Path, name: str) -> dict:
    return {
        "index": {"k": 3},
        "train": {"base_model": str(base), "steps": 3, "batch_size": 8},
        "evaluate": {"min_images_per_individual": 1, "max_images_per_individual": 2, "num_inference_steps": 2, "buckets": {"many_above": 4, "few_below": 2}},
        "registry": {"experiment": name, "model_name": f"{name}-model"},
    }


def work_pool_deployments(client) -> dict:
    """What `prefect deploy` made and a worker relies on, per deployment."""
    out = {}
    for name in WORK_POOL_DEPLOYMENTS:
        d = client.read_deployment_by_name(name)
        out[name] = {"id": d.id, "work_pool": d.work_pool_name, "pull_steps": d.pull_steps, "path": d.path,
                     "entrypoint": d.entrypoint, "parameters": d.parameters, "paused": d.paused,
                     "schedules": sorted((s.schedule.model_dump_json(), s.active) for s in d.schedules)}
    return out


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (bash and what it started), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def side_by_side(tmp_path_factory, tiny_spec, prefect_api):
    """The runbook's setup run, its worker started and its run triggered; `pogdiff serve` started on
    the same server with two runs of its own. Each path has its own home (stores)."""
    root = tmp_path_factory.mktemp("scheduling")
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(root / "base")
    # the worker's home: the deployments' default source (demo-catalogue under data/) and a config named by the trigger
    worker_home = root / "worker-home"
    folder.generate_longtail(worker_home / "data" / "demo-catalogue", seed=5, size=16, max_count=6, alpha=1.0, min_count=1)
    (worker_home / "configs").mkdir()
    (worker_home / "configs" / "nightly.yaml").write_text(yaml.safe_dump(tiny_config(root / "base", "nightly")))
    # serve's: a source and a config file given on its command line
    folder.generate_longtail(root / "source", seed=5, size=16, max_count=6, alpha=1.0, min_count=1)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(root / "base", "served")))

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("POGDIFF_", "PREFECT_API_URL", "PREFECT_UI_URL", "MLFLOW_TRACKING"))}
    env = {**base_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `prefect` of this environment
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),  # this checkout's code
           "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1",
           # the worker and the served runner look for due runs every second, not every 10
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    worker_env = {**env, "POGDIFF_HOME": str(worker_home)}
    for home in (worker_home, root / "serve-home"):
        seed_mlflow_store(home / "mlflow.db")
    logs = root / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str, run_env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=open(logs / log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
            assert not client.read_work_pools(), "the runbook starts on a server without work pools"
            setup = subprocess.run(["bash", "-ec", runbook("setup", prefect_api)], cwd=ROOT, env=worker_env,
                                   capture_output=True, text=True, timeout=300)
            assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
            deployed = work_pool_deployments(client)
            worker = start(["bash", "-ec", runbook("worker", prefect_api)], "worker.log", worker_env)
            trigger = start(["bash", "-ec", runbook("trigger", prefect_api)], "trigger.log", worker_env)
            serve = start([sys.executable, "-m", "flows.cli", "serve", "--deployment", "retrain-nightly",
                           "--source", str(root / "source"), "--config", str(root / "tiny.yaml")], "serve.log",
                          {**env, "POGDIFF_HOME": str(root / "serve-home"), "PREFECT_API_URL": prefect_api})

            def served_deployment():
                try:
                    return client.read_deployment_by_name("retrain/retrain-nightly-served")
                except Exception:  # not registered yet (ObjectNotFound) while `serve` starts
                    return None

            served = wait_for(served_deployment, 180, "the served deployment", [serve, worker], interval=1)
            served_runs = [client.create_flow_run_from_deployment(served.id) for _ in range(2)]
        yield SimpleNamespace(api=prefect_api, logs=logs, worker_home=worker_home, deployed=deployed, worker=worker,
                              trigger=trigger, serve=serve, served=served, served_runs=served_runs)
    finally:
        for p in reversed(procs):
            stop(p)


def _runbook_run_completes_and_registers_a_version(s) -> None:
    try:
        code = s.trigger.wait(540)
    except subprocess.TimeoutExpired:
        raise AssertionError((s.logs / "worker.log").read_text()[-5000:]) from None
    out = (s.logs / "trigger.log").read_text()
    assert code == 0 and "Flow run finished successfully in 'Completed'" in out, out[-3000:] + (s.logs / "worker.log").read_text()[-3000:]
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state.type.value == "COMPLETED" and run.deployment_id == s.deployed["retrain/retrain-nightly"]["id"]
        assert run.parameters == {"source": "demo-catalogue", "config": "nightly"}  # the trigger named the file, the rest is prefect.yaml's
    # the worker's run read nightly.yaml from the worker's POGDIFF_HOME and registered into its MLflow store
    store = f"sqlite:///{s.worker_home / 'mlflow.db'}"
    # both URIs: an earlier in-process test may have set this process's global registry URI
    mlflow = MlflowClient(tracking_uri=store, registry_uri=store)
    (version,) = mlflow.search_model_versions("name='nightly-model'")
    assert str(version.version) == "1" and mlflow.get_run(version.run_id).data.params["train.steps"] == "3"


def _served_retrain_runs_complete_one_at_a_time(s) -> None:
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        assert s.served.global_concurrency_limit.limit == 1 and s.served.schedules and s.served.work_pool_name is None

        def finished():
            states = [client.read_flow_run(r.id).state for r in s.served_runs]
            return states if all(st.type.value in FINAL for st in states) else None

        try:
            states = wait_for(finished, 540, "both served runs to finish", [s.serve], interval=1)
        except AssertionError:
            print((s.logs / "serve.log").read_text()[-5000:])
            raise
        assert [st.type.value for st in states] == ["COMPLETED", "COMPLETED"], (s.logs / "serve.log").read_text()[-5000:]

        spans = []
        for r in s.served_runs:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
            train = [t for t in tasks if t.name.startswith("train-")]
            assert len(train) == 1 and train[0].state.type.value == "COMPLETED"
            spans.append((train[0].start_time, train[0].end_time))
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
            report = [a for a in artifacts if a.key == "retrain-report"]
            assert report and "| grecall ↑ |" in report[0].data and "| metric | many |" in report[0].data
        (a_start, a_end), (b_start, b_end) = sorted(spans)
        assert a_end <= b_start, f"two trainings overlapped: {spans}"
        # both were picked up together; the deployment's limit made one of them wait for the other
        history = [[st.name for st in client.read_flow_run_states(r.id)] for r in s.served_runs]
        assert any("AwaitingConcurrencySlot" in h for h in history), history


def _serve_leaves_the_work_pool_deployments_alone(s) -> None:
    nightly = s.deployed["retrain/retrain-nightly"]
    assert nightly["work_pool"] == "local" and nightly["pull_steps"] and not nightly["paused"]
    assert nightly["schedules"] and all(active for _, active in nightly["schedules"])
    serve_log = s.logs / "serve.log"
    assert "also schedules work-pool deployments of these flows: retrain-nightly (pool local)" in serve_log.read_text()
    with temporary_settings({PREFECT_API_URL: s.api}), get_client(sync_client=True) as client:
        assert work_pool_deployments(client) == s.deployed  # while serve runs
        s.serve.send_signal(signal.SIGTERM)  # as a service manager stops it
        s.serve.wait(60)
        assert "All deployments have been paused" in serve_log.read_text()
        assert work_pool_deployments(client) == s.deployed  # and after it stopped: only its own are paused
        assert client.read_deployment_by_name("retrain/retrain-nightly-served").paused


def test_runbook_and_serve_side_by_side(side_by_side):
    """One test, not three on one fixture: pytest-xdist may hand tests of one module to different
    workers, and each would then build the whole setup (a deploy, a worker, serve and four flow
    runs) again. Serve is stopped last, after its runs finished."""
    _runbook_run_completes_and_registers_a_version(side_by_side)
    _served_retrain_runs_complete_one_at_a_time(side_by_side)
    _serve_leaves_the_work_pool_deployments_alone(side_by_side)
