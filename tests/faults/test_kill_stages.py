"""SIGKILL inside each stage of the retrain flow in turn, each re-run killed in the next stage, then
a re-run that completes: the final state is complete and consistent (no duplicate rows, LanceDB versions in use are the tables' current ones, training
resumed from its last checkpoint, one registered version, no MLflow run left RUNNING).

"Inside stage X" is read from the Prefect server: the stage's task run is RUNNING (and, for train,
a checkpoint exists); the kill follows after a random delay, and the task run must still be
RUNNING afterwards (a killed process never reports its end), which proves where the kill landed.
"""

from __future__ import annotations

import random
import shutil
import time

import lancedb
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from storage import dataset
from storage.mlflow import connection
from faultkit import EXPERIMENT, MODEL_NAME, cli_env, flow_run_id, record, start_cli
from localserver import seed_mlflow_store, wait_for

# stage -> (task name, longest random delay in s after the task is seen running, config overrides).
# On the tiny data ingest and index take well under a second; real settings make them last long
# enough to be hit: spawned ingest workers, and one embedding shard (a Prefect task) per caption.
STAGES = {
    "ingest": ("ingest", 0.5, {"ingest": {"resolution": 32, "parallelism": "processes"}}),
    "index": ("index-captions", 0.1, {"index": {"k": 3, "batch_size": 1, "embed_shard_size": 1}}),
    "train": ("train", 0.8, {}),
    "evaluate": ("evaluate", 1.0, {}),
    "register": ("register", 1.0, {}),
}


def _task_runs(client, run_id):
    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def _checkpoints(home) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (home / "runs").glob("*/checkpoints/step-*"))


ATTEMPTS = 4


def _run_and_kill(client, args, env, home, stage: str, task_name: str, delay: float, log) -> tuple[bool, int | None]:
    """Start a retrain, SIGKILL it ``delay`` s after ``stage`` is seen running; (whether the kill
    landed inside the stage, the last checkpoint step when the stage is train)."""
    first = start_cli(args, env, log)

    def began():
        if first.proc.poll() is not None:
            raise AssertionError(f"retrain ended before the kill:\n{first.log.read_text()[-3000:]}")
        return flow_run_id(first.log.read_text())

    flow_run = client.read_flow_run(wait_for(began, 300, "the retrain flow run"))

    def stage_running():
        if first.proc.poll() is not None:
            raise AssertionError(f"retrain ended before the kill:\n{first.log.read_text()[-3000:]}")
        runs = _task_runs(client, flow_run.id)
        running = [t for t in runs if t.name.startswith(f"{task_name}-") and t.state and t.state.type.value == "RUNNING"]
        # the index stage starts with its embedding tasks, which run before index-captions
        inner = stage == "index" and any(t.name.startswith(("plan-embedding-", "embed-shard-")) for t in runs)
        return (running or inner) and (stage != "train" or bool(_checkpoints(home)))

    wait_for(stage_running, 400, f"the {stage} stage to run", interval=0.02)
    time.sleep(delay)
    first.kill()
    time.sleep(1)  # the server has received everything the process sent before it died
    states = [t.state.type.value for t in _task_runs(client, flow_run.id) if t.name.startswith(f"{task_name}-")]
    return "COMPLETED" not in states, (_checkpoints(home)[-1] if stage == "train" else None)


@pytest.mark.slow
def test_sigkill_inside_each_stage_then_rerun_completes(prefect_api, tiny, tmp_path):
    """One home, one chain: the first retrain is killed inside ingest, its re-run inside index, the
    next inside train, then evaluate, then register; the last re-run completes. Each re-run had to
    recover from the previous kill to reach the next stage, and the end state is checked once."""
    source, base_config, n_images = tiny
    config = tmp_path / "config.yaml"
    merged = yaml.safe_load(base_config.read_text())
    for _, _, overrides in STAGES.values():
        for section, values in overrides.items():
            merged[section] = {**merged.get(section, {}), **values}
    config.write_text(yaml.safe_dump(merged))
    home = tmp_path / "home"
    env = cli_env(home, prefect_api)
    args = ["retrain", str(source), "--config", str(config)]
    rng = random.Random()
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        # A kill that lands after its stage ended (ingest lasts well under a second here) tests
        # nothing, and a finished stage cannot be run again on the same home: the chain restarts
        # on a fresh home with shorter delays, down to killing as soon as each stage is seen running.
        for attempt in range(ATTEMPTS):
            shutil.rmtree(home, ignore_errors=True)
            seed_mlflow_store(home / "mlflow.db")
            killed_at = None
            for stage, (task_name, jitter, _) in STAGES.items():
                delay = rng.uniform(0, jitter / 2**attempt) if attempt < ATTEMPTS - 1 else 0.0
                log = tmp_path / f"killed-{attempt}-{stage}.log"
                landed, at = _run_and_kill(client, args, env, home, stage, task_name, delay, log)
                if not landed:
                    break
                if stage == "evaluate":  # the run killed in evaluate was the one that resumed the training
                    assert f"resumed from checkpoint at step {killed_at}" in log.read_text()
                if stage == "train":
                    killed_at = at
            else:
                break
        assert landed, f"in {ATTEMPTS} attempts no kill landed inside {stage}"

        rc, out = start_cli(args, env, tmp_path / "rerun.log").wait()
    assert rc == 0, out[-4000:]

    # ingest: every image exactly once, nothing quarantined
    ids = dataset.read_images(home / "dataset", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n_images
    assert dataset.read_quarantine(home / "dataset").num_rows == 0

    # index: one row per caption, and the versions the run recorded are the tables' current ones
    db = lancedb.connect(str(home / "lancedb"))
    captions = db.open_table("captions")
    caption_ids = captions.to_arrow().column("caption_id").to_pylist()
    assert len(caption_ids) == len(set(caption_ids)) == 24

    # MLflow: one run, FINISHED, none RUNNING; exactly one registered version, of that run
    connection.configure(f"sqlite:///{home / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    run = runs[0]
    assert run.data.tags["lancedb_captions_version"] == str(captions.version)
    assert run.data.tags["lancedb_image_features_version"] == str(db.open_table("image_features").version)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run.info.run_id)]
    assert {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()} == {"challenger": "1", "champion": "1"}
    assert run.data.tags.get("resumed_from_crash") == "true"  # the MLflow run exists from open-run on
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    # resumed from the last checkpoint, not from zero: step 1 was trained once
    assert max(steps) == 40 and steps.count(1) == 1
    outcomes = {
        "ingest": "re-run re-ingests: every image once, no duplicate ids; one run, one version",
        "index": "re-run re-indexes: one row per caption; one run, one version",
        "train": f"same MLflow run resumed (`resumed_from_crash=true`), training continued from checkpoint step {killed_at}, not 0",
        "evaluate": "same MLflow run resumed, training skipped (final checkpoint), evaluated again; one version",
        "register": "same MLflow run resumed; the version it registered is reused or registered once",
    }
    for stage, outcome in outcomes.items():
        record("SIGKILL of the whole retrain process group", stage, outcome)
