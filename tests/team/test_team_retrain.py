"""The team deployment end to end (issue 34): two Prefect process workers on the team stack
(tests/team/stack.py: PostgreSQL, an S3 server, MLflow with basic-auth and proxied S3 artifacts,
Prefect with an auth string), each with its own home, sharing only the stores and one shared volume.

- Settings: the Parquet dataset on ``s3://<bucket>/dataset``, LanceDB on ``s3://<bucket>/lancedb``,
  MLflow and Prefect at the stack's servers, ``runs_dir`` (checkpoints, model folders, the cached
  stage results) on the shared volume; every credential is an environment variable.
- ``prefect work-pool create`` and ``prefect deploy`` as the runbook does; the retrain deployment's
  first run, on worker A, is SIGKILLed mid-training (a checkpoint written, the train task running);
  the second, on worker B, finds ingest and index cached (nothing re-embedded), resumes the same
  MLflow run from A's last checkpoint, and completes.
- The data went through the stores: dataset parts, quarantine and LanceDB tables in the bucket, the
  run's and the model's artifacts under MLflow's S3 prefix, put there by its proxy.
- From a third home (only the environment): ``pogdiff models --json``, ``compare`` and ``evaluate``;
  the champion loads through ``mlflow.pyfunc`` in a fresh interpreter given only the tracking URI
  and the account (and the documented proxy-download switch, see below).
- No credential appears in any output the test captured (workers, CLI, servers, Prefect logs and
  parameters) or in anything the pipeline stored (bucket objects, MLflow params and tags, files
  of the homes and the shared volume).

One test, on purpose (as test_stack.py): the stack takes a while to come up, and pytest-xdist would
start one per worker for tests spread over several.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from clirunner import run_cli
from localserver import wait_for
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from workers import leaked, prefect, start_worker, worker_env

from pogdiff.demo import folder
from pogdiff.pipelines.pixel import PixelDiffusionPipeline

pytestmark = pytest.mark.slow  # the team stack, two workers and two flow runs: see pyproject's marker

MODEL, EXPERIMENT = "team-model", "team-retrain"
STEPS, CHECKPOINT_EVERY = 40, 4
POOL, DEPLOYMENT = "local", "retrain/retrain-nightly"
CACHED_STAGES = ("ingest-", "index-captions-", "index-images-")


def _source(root: Path, tiny_spec) -> tuple[Path, Path]:
    """A tiny catalogue (with one unreadable photo, for the quarantine) and a config whose retrain
    trains STEPS steps with a checkpoint every CHECKPOINT_EVERY: (source folder, config file)."""
    source = root / "source"
    folder.generate_longtail(source, seed=5, size=16, max_count=6, alpha=1.0, min_count=1)
    (source / "images" / "broken.png").write_bytes(b"not an image")
    with open(source / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(source / "captions.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**rows[0], "image": "images/broken.png", "caption": f"{rows[0]['caption']}, again"})
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(root / "base")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "index": {"k": 3},
        "train": {"base_model": str(root / "base"), "steps": STEPS, "batch_size": 8, "checkpoint_every": CHECKPOINT_EVERY},
        "evaluate": {"min_images_per_individual": 1, "max_images_per_individual": 2, "num_inference_steps": 2,
                     "buckets": {"many_above": 4, "few_below": 2}},
        "registry": {"experiment": EXPERIMENT, "model_name": MODEL},
    }))
    return source, config


def _checkpoints(runs_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in runs_dir.glob("*/checkpoints/step-*"))


def _task_runs(client, flow_run_id) -> list:
    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _s3_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def test_two_workers_retrain_through_the_shared_stores(team_stack, tiny_spec, tmp_path, capfd):
    started, phases = time.monotonic(), {}  # seconds after the stack was up, at the end of each phase

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - started)

    stack = team_stack
    bucket = stack.s3.bucket
    secrets = {"MLflow admin password": stack.mlflow_account[1], "Prefect auth string": stack.prefect_auth_string,
               "Prefect auth token": stack.prefect_auth_string.split(":", 1)[1], "S3 secret key": stack.s3.secret_key,
               "PostgreSQL password": stack.postgres.password,
               "MLflow server secret key": stack.credentials["MLFLOW_FLASK_SERVER_SECRET_KEY"],
               "MinIO root password": stack.credentials["MINIO_ROOT_PASSWORD"]}
    captured: dict[str, str] = {}  # every output this test captured: scanned for credentials at the end
    source, config = _source(tmp_path / "data", tiny_spec)
    logs = tmp_path / "logs"
    logs.mkdir()
    phase("tiny source")

    # 1. Settings: the dataset and LanceDB in the bucket, runs_dir on the shared volume, one home per host.
    dataset_uri = f"s3://{bucket}/dataset"
    env = {name: worker_env(stack, tmp_path / f"home-{name}", POGDIFF_DATASET_URI=dataset_uri) for name in ("a", "b", "c")}
    settings = yaml.safe_load(Path(env["a"]["POGDIFF_SETTINGS_FILE"]).read_text())
    assert settings["lancedb_uri"] == f"s3://{bucket}/lancedb" and settings["home"] == str(tmp_path / "home-a")
    assert settings["mlflow_tracking_uri"] == stack.mlflow_uri
    runs_dir = Path(settings["runs_dir"])  # the shared volume: the same folder in every worker's settings
    assert runs_dir.is_relative_to(stack.root / "shared-volume")
    assert yaml.safe_load(Path(env["b"]["POGDIFF_SETTINGS_FILE"]).read_text())["runs_dir"] == str(runs_dir)
    for name in env:  # credentials only in the environment, never in a settings file
        captured[f"settings file of home {name}"] = Path(env[name]["POGDIFF_SETTINGS_FILE"]).read_text()

    # 2. The pool, its two queues (one per worker, so each run lands on the worker the test means),
    #    the retrain deployment from prefect.yaml, and the two workers.
    setup_log = logs / "setup.log"
    prefect(["work-pool", "create", POOL, "--type", "process"], env["a"], setup_log)
    prefect_settings = {PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.prefect_auth_string}
    with temporary_settings(prefect_settings), get_client(sync_client=True) as client:
        for queue in ("a", "b"):
            client.create_work_queue(name=queue, work_pool_name=POOL)
    phase("pool")
    workers = {name: start_worker(f"team-worker-{name}", POOL, name, env[name], logs / f"worker-{name}.log") for name in ("a", "b")}
    try:
        prefect(["--no-prompt", "deploy", "--name", DEPLOYMENT.split("/")[1]], env["a"], setup_log, timeout=240)
        with temporary_settings(prefect_settings), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            assert deployment.work_pool_name == POOL and deployment.entrypoint == "flows/retrain.py:retrain"
            phase("deploy")
            parameters = {"source": str(source), "config": str(config)}

            # 3. The first run, on worker A: SIGKILLed once a checkpoint is written and training runs.
            first = client.create_flow_run_from_deployment(deployment.id, parameters=parameters, work_queue_name="a")

            def training() -> bool:
                state = client.read_flow_run(first.id).state
                if state is not None and state.is_final():
                    raise AssertionError(f"the first run ended ({state.type.value}) before the kill:\n{workers['a'].output()[-4000:]}")
                if not _checkpoints(runs_dir):
                    return False
                return any(t.name.startswith("train-") and t.state.type.value == "RUNNING" for t in _task_runs(client, first.id))

            wait_for(training, 240, "the first run to train past a checkpoint", [workers["a"].proc], interval=0.05)
            killed = workers["a"].kill_flow_runs()
            assert killed, "worker A runs no flow-run process"
            crashed = wait_for(lambda: (s := client.read_flow_run(first.id).state).is_final() and s, 60,
                               "worker A to report the killed run", [workers["a"].proc])
            killed_at = _checkpoints(runs_dir)[-1]
            assert crashed.type.value == "CRASHED", crashed
            assert 0 < killed_at < STEPS
            trains = [t.state.type.value for t in _task_runs(client, first.id) if t.name.startswith("train-")]
            assert trains == ["RUNNING"], f"the kill did not land inside training: {trains}"  # a killed process never reports its end
            phase("first run killed")

            # 4. The second run, on worker B: cached ingest and index, resumed training, Completed.
            second = client.create_flow_run_from_deployment(deployment.id, parameters=parameters, work_queue_name="b")
            done = wait_for(lambda: (s := client.read_flow_run(second.id).state).is_final() and s, 240,
                            "the second run to end", [workers["b"].proc], interval=0.5)
            assert done.type.value == "COMPLETED", workers["b"].output()[-5000:]
            phase("second run completed")
            # A ingested, embedded and indexed; B found all of it in the cache A left on the shared
            # volume (B's own home has none), and embedded nothing
            cold = {t.name: t.state for t in _task_runs(client, first.id)}
            warm = {t.name: t.state for t in _task_runs(client, second.id)}
            for stage in CACHED_STAGES:
                (a,) = [s for name, s in cold.items() if name.startswith(stage)]
                (b,) = [s for name, s in warm.items() if name.startswith(stage)]
                assert (a.name, b.name) == ("Completed", "Cached"), (stage, a, b)
            assert [name for name in cold if name.startswith("embed-shard-")], f"A embedded nothing: {sorted(cold)}"
            assert not [name for name in warm if name.startswith("embed-shard-")], f"B re-embedded: {sorted(warm)}"
            assert list((runs_dir / "prefect-results").iterdir()) and not (tmp_path / "home-b" / "prefect-results").exists()
            for run in (first, second):
                flow_run = client.read_flow_run(run.id)
                captured[f"parameters of flow run {run.id}"] = json.dumps(flow_run.parameters)
                captured[f"Prefect logs of flow run {run.id}"] = "\n".join(
                    log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))))
            prefect_logs = captured[f"Prefect logs of flow run {second.id}"]
            assert f"train: resumed from checkpoint at step {killed_at}" in prefect_logs, prefect_logs[-4000:]
    finally:
        for worker in workers.values():
            worker.stop()
    for name, worker in workers.items():
        captured[f"worker {name}'s output"] = worker.output()
    # each run ran on the worker it was sent to
    assert str(first.id) in captured["worker a's output"] and str(second.id) not in captured["worker a's output"]
    assert str(second.id) in captured["worker b's output"] and str(first.id) not in captured["worker b's output"]
    captured["prefect work-pool create / deploy"] = setup_log.read_text()
    phase("workers stopped")

    # The data went through the stores: dataset parts and quarantine, LanceDB tables, MLflow artifacts.
    s3 = stack.s3.client()
    assert [k for k in _s3_keys(s3, bucket, "dataset/images/") if k.endswith(".parquet")]
    assert [k for k in _s3_keys(s3, bucket, "dataset/quarantine/") if k.endswith(".parquet")]
    lance = _s3_keys(s3, bucket, "lancedb/")
    for table in ("captions", "image_features"):
        assert any(k.startswith(f"lancedb/{table}.lance/data/") for k in lance), table
    user_env = {k: env["c"][k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in user_env.items():
            mp.setenv(key, value)
        mlflow = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        (run,) = mlflow.search_runs([experiment.experiment_id])  # one run: the second resumed the first's
        (version,) = mlflow.search_model_versions(f"name = '{MODEL}'")
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "train/loss")]
        captured["MLflow params and tags"] = json.dumps({**run.data.params, **run.data.tags, **version.tags})
        model_uri = mlflow.get_model_version_download_uri(MODEL, version.version)  # mlflow-artifacts:/<exp>/models/<id>/artifacts
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed_from_crash") == "true"
    assert (runs_dir / run.info.run_id / "checkpoints").is_dir(), sorted(runs_dir.iterdir())  # on the shared volume
    assert version.run_id == run.info.run_id and str(version.version) == "1"
    # resumed, not restarted: no step up to the checkpoint trained twice; each later one trained (by
    # B, and also by A when A got past the checkpoint before the kill)
    assert max(steps) == STEPS and all(steps.count(s) <= 1 for s in range(1, killed_at + 1)), steps
    assert all(1 <= steps.count(s) <= 2 for s in range(killed_at + 1, STEPS + 1)), steps
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # through the proxy
    prefix = f"mlflow/{experiment.experiment_id}/"
    assert _s3_keys(s3, bucket, f"{prefix}{run.info.run_id}/artifacts/eval/")
    assert model_uri.startswith(f"mlflow-artifacts:/{experiment.experiment_id}/models/"), model_uri
    model_key = "mlflow/" + model_uri.split(":/", 1)[1].strip("/")
    assert f"{model_key}/MLmodel" in _s3_keys(s3, bucket, f"{model_key}/")

    # 5. A third home, only the environment: models, compare and evaluate.
    def pogdiff(args: list[str]):
        with temporary_settings({PREFECT_API_AUTH_STRING: stack.prefect_auth_string}):
            out = run_cli(args, capfd, timeout=120, **env["c"])
        captured[f"pogdiff {' '.join(args)}"] = out.output
        assert out.returncode == 0, out.output[-4000:]
        return out

    listed = json.loads(pogdiff(["models", "--json", "--model", MODEL]).stdout)
    assert [(v["version"], sorted(v["aliases"]), v["run_id"]) for v in listed] == [("1", ["challenger", "champion"], run.info.run_id)]
    assert "few/grecall" in listed[0]["metrics"]
    compared = json.loads(pogdiff(["compare", "champion", "challenger", "--model", MODEL, "--json"]).stdout)
    assert {(r["bucket"], r["metric"]) for r in compared["rows"]} >= {("few", "grecall"), ("overall", "frechet_pixels16")}
    pogdiff(["evaluate", f"{MODEL}@champion", "--config", str(config)])
    phase("third home")

    # 6. The champion loads through mlflow.pyfunc in a fresh interpreter that has only the tracking
    #    URI and the account. MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false is the runbook's client
    #    switch (deploy/team/README.md): moto's S3 server refuses presigned URLs while it checks
    #    signatures, so artifacts must come back through the server's proxy.
    code = ("import json, sys, mlflow.pyfunc, pandas as pd\n"
            f"model = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
            "images = model.predict(pd.DataFrame({'prompt': ['a photo'], 'num_inference_steps': [2]}))\n"
            "print(json.dumps({'run_id': model.metadata.run_id, 'shape': list(images.shape)}))\n")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    only = {"MLFLOW_TRACKING_URI": stack.mlflow_uri, **user_env, "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
    loaded = subprocess.run([sys.executable, "-c", code], cwd=fresh, env=only, capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL)
    captured["mlflow.pyfunc in a fresh interpreter"] = loaded.stdout + loaded.stderr
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {"run_id": run.info.run_id, "shape": [1, 16, 16, 3]}
    phase("pyfunc")

    # 7. No credential in anything captured, nor in what the pipeline stored.
    for path in [*stack.root.glob("*.log"), *stack.root.glob("*/server.log")]:
        captured[f"server log {path.relative_to(stack.root)}"] = path.read_text(errors="replace")
    found = {what: names for what, text in captured.items() if (names := leaked(text, secrets))}
    assert not found, f"credentials in captured output: {found}"
    stored = {f"s3://{bucket}/{key}": s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in _s3_keys(s3, bucket)}
    for folder_ in (runs_dir.parent, *(tmp_path / f"home-{name}" for name in env)):
        stored.update({str(p): p.read_bytes() for p in folder_.rglob("*") if p.is_file()})
    found = {where: names for where, data in stored.items()
             if (names := [n for n, v in secrets.items() if v.encode() in data])}
    assert not found, f"credentials in stored files: {found}"
    phase("credential scan")
    print(f"team retrain test, s after the stack was up: {phases}")
