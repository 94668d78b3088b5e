"""End to end: the retrain flow on a tiny data set, on a real Prefect test server, LanceDB and MLflow."""

import csv
import getpass
import json
import subprocess
from pathlib import Path

import lancedb
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import ArtifactSort

from pogdiff.demo import folder
from pogdiff.glossary import glossary
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from storage import dataset
from storage.mlflow import connection
from storage.settings import REPO_ROOT
from tasks.config import parse_config
from tasks.results import RetrainResult

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

K = 3
UI = "http://mlflow.test:5000"  # the MLflow UI address links are made of (nothing needs to serve it)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("e2e")
    source = root / "source"
    summary = folder.generate_longtail(source, seed=3, size=16, max_count=8, alpha=1.0, min_count=1)
    base = root / "base"
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(base)
    config = parse_config({
        "index": {"k": K, "embed_shard_size": 10},  # one caption per image: several embedding shards
        "train": {"base_model": str(base), "steps": 3, "batch_size": 8, "checkpoint_every": 2},
        "evaluate": {"min_images_per_individual": 1, "max_images_per_individual": 2, "num_inference_steps": 2, "buckets": {"many_above": 4, "few_below": 2}},
        "registry": {"experiment": "e2e", "model_name": "e2e-model"},
    })
    return root, source, summary, config


def _task_runs(flow_state) -> list[tuple[str, str]]:
    """(task name without its run suffix, state name) of every task run of a flow run."""
    with get_client(sync_client=True) as api:
        runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs]


def _artifact(flow_state, key: str):
    """The newest ``key`` artifact of one flow run (the session's Prefect server is shared by every
    worker: ``Artifact.get(key)`` is whichever run, of any test, wrote that key last)."""
    with get_client(sync_client=True) as api:
        found = api.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1,
                                   flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return found[0] if found else None


def _task_names(flow_state) -> list[str]:
    return [name for name, _ in _task_runs(flow_state)]


def _flow_run(flow_state):
    with get_client(sync_client=True) as api:
        return api.read_flow_run(flow_state.state_details.flow_run_id)


def _check_reviewer_records(client, run, flow_state, first: RetrainResult, home, prefect_api: str) -> None:
    """What a reviewer opens after the first retrain explains itself and links to the rest (issue 20)."""
    tags, snapshot, flow_run_id = run.data.tags, first.ingest.report.snapshot_id, str(flow_state.state_details.flow_run_id)
    # what ran it: MLflow's own source, commit and user tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("flows/retrain.py:retrain", "JOB")
    assert tags["mlflow.source.git.commit"] == commit and tags["mlflow.user"] == getpass.getuser()
    # links both ways: the run names its flow run's page; the flow run carries model, snapshot and method
    flow_url = f"{prefect_api.removesuffix('/api')}/runs/flow-run/{flow_run_id}"
    assert tags["prefect_flow_run_id"] == flow_run_id and tags["prefect_flow_run_url"] == flow_url
    assert {"model:e2e-model", f"snapshot:{snapshot}", "method:pogdiff"} <= set(_flow_run(flow_state).tags)

    # the logged model: named after the registered model, its "Datasets used" are the run's five inputs
    v1 = client.get_model_version("e2e-model", "1")
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert v1.source == f"models:/{output.model_id}"
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert logged.name == "e2e-model" and len(inputs) == 5
    assert {(m.dataset_name, m.dataset_digest) for m in logged.metrics if m.dataset_name} == inputs
    rows = {m.key: m.value for m in logged.metrics if m.key.startswith("data/")}
    assert rows["data/training/dataset/rows"] == first.snapshot.rows

    # the glossary of every metric the run logged, as JSON and markdown artifacts
    logged_names = {k.split("/", 1)[1] for k in first.metrics}
    local = client.download_artifacts(run.info.run_id, "metrics_glossary.json", str(home / "glossary"))
    assert json.loads(Path(local).read_text(encoding="utf-8")) == glossary(first.metrics)
    assert set(glossary(first.metrics)["metrics"]) == logged_names
    md = Path(client.download_artifacts(run.info.run_id, "metrics_glossary.md", str(home / "glossary"))).read_text(encoding="utf-8")
    assert "| `frechet_pixels16` | lower |" in md and "Why overall differs" in md

    # descriptions: the run, the experiment, the registered model and the version
    version_link = f"{UI}/#/models/e2e-model/versions/1"
    run_link = f"{UI}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    first_version = "First version: promoted to `champion` because there was no champion to compare with"
    note = tags["mlflow.note.content"]
    assert f"Registered as [e2e-model version 1]({version_link})." in note and first_version in note
    assert f"dataset snapshot `{snapshot}` ({first.snapshot.rows} rows), by Prefect flow run [`{flow_run_id}`]({flow_url})" in note
    assert "| metric | many | medium | few | overall |" in note and "| grecall ↑ |" in note
    assert "- `frechet_pixels16` (lower is better)" in note
    text = v1.description
    assert text.startswith("### e2e-model version 1") and first_version in text and f"[`{run.info.run_name}`]({run_link})" in text
    assert f"by Prefect flow run [`{flow_run_id}`]({flow_url})" in text and "| frechet_pixels16 ↓ |" in text
    manifest = (home / "dataset" / "snapshots" / f"{snapshot}.json").as_uri()
    assert f"[its manifest]({manifest})" in text
    for name, _ in inputs:  # each input with its row count
        assert f"| `{name}` |" in text
    assert f"| `dataset@{snapshot}` | training | {first.snapshot.rows} |" in text
    assert "#### Metrics glossary" in text and len(text) <= 5000
    assert "`challenger`: the latest version" in client.get_registered_model("e2e-model").description
    assert "overall/frechet_pixels16` worsens by at most 5 %" in client.get_registered_model("e2e-model").description
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.note.content"].startswith("Runs of the PoGDiff pipeline for `e2e-model`")

    # the Prefect report links the run and the version (no champion yet: nothing to compare)
    report = _artifact(flow_state, "retrain-report").data
    assert f"[run `{run.info.run_id}`]({run_link})" in report and f"[e2e-model version 1]({version_link})" in report
    assert "no earlier champion to compare with" in report


def test_retrain_flow_end_to_end(prefect_server, setup, monkeypatch):
    root, source, summary, config = setup
    home = root / "home"
    monkeypatch.setenv("POGDIFF_HOME", str(home))
    monkeypatch.setenv("POGDIFF_MLFLOW_UI_URL", UI)
    from flows.retrain import retrain

    state = retrain(str(source), config, return_state=True)
    first = state.result()

    # ingest: every row of the captions file landed in Parquet, nothing quarantined
    with open(source / "captions.csv", newline="") as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    assert first.ingest.report.accepted == n_rows == summary["images"] + summary["holdout"]  # held-out photos are rows too
    assert dataset.read_images(home / "dataset", columns=["id"]).num_rows == n_rows
    assert dataset.read_quarantine(home / "dataset").num_rows == 0

    # index: every distinct training caption (one per image, mostly) has a vector, k neighbours and a density;
    # held-out captions are never indexed (they are never a neighbour y', never counted in a density)
    with open(source / "captions.csv", newline="") as f:
        distinct = {row["caption"] for row in csv.DictReader(f) if row["split"] == "train"}
    caps = lancedb.connect(str(home / "lancedb")).open_table("captions").to_arrow()
    assert caps.num_rows == len(distinct) == first.captions.report.embedded == summary["captions"]
    assert len(distinct) > summary["individuals"]
    ids = set(caps.column("caption_id").to_pylist())
    for row in caps.to_pylist():
        assert len(row["neighbour_ids"]) == K and set(row["neighbour_ids"]) <= ids - {row["caption_id"]}
        assert row["density"] >= row["count"] > 0
    assert first.images.report.computed == summary["images"]  # psi's image feature: training photos only
    assert _task_names(state).count("embed-shard") == -(-len(distinct) // 10)  # mapped over the flow's task runner

    # MLflow: a finished run with per-bucket metrics and per-step losses; a version with an alias
    connection.configure(f"sqlite:///{home / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert {"overall/grecall", "overall/accuracy", "few/grecall", "many/grecall"} <= set(run.data.metrics)
    assert len(client.get_metric_history(first.run_id, "train/loss")) == 3
    assert run.data.params["train.pog.method"] == "pogdiff"
    assert run.data.tags["dataset_snapshot_id"] == first.ingest.report.snapshot_id
    assert run.inputs.dataset_inputs, "dataset lineage missing"
    v1 = client.get_model_version("e2e-model", "1")
    assert v1.run_id == first.run_id
    model = client.get_registered_model("e2e-model")
    assert model.aliases.get("challenger") in (1, "1") and model.aliases.get("champion") in (1, "1")

    # the run page tells the story: a markdown artifact with the bucket table and the decision
    artifact = _artifact(state, "retrain-report")
    assert artifact is not None and "| grecall ↑ |" in artifact.data and "version 1" in artifact.data
    assert first.run_id in artifact.data
    progress = _artifact(state, "training-progress")
    assert progress is not None and float(progress.data) == 100.0
    _check_reviewer_records(client, run, state, first, home, prefect_server)

    # a second run over unchanged data skips ingest and index (cache hits), but trains a new version
    state = retrain(str(source), config, return_state=True)
    second = state.result()
    assert second.ingest.cached and second.captions.cached and second.images.cached
    assert second.snapshot == first.snapshot
    states = {name: state_name for name, state_name in _task_runs(state)}
    assert states["ingest"] == states["index-captions"] == states["index-images"] == "Cached", states
    assert states["train"] == states["register"] == "Completed", states
    assert second.run_id != first.run_id
    assert second.decision.version == "2"
    assert client.get_registered_model("e2e-model").aliases.get("challenger") in (2, "2")
    # the second version is described against the first, and the report links the two runs side by side
    v2 = client.get_model_version("e2e-model", "2").description
    assert ("Promoted to `champion` over version 1: the gate passed" in v2
            or "Stays `challenger`; version 1 remains `champion` because the gate failed" in v2), v2
    assert "| metric | many | medium | few | overall |" in v2 and "| ↳ champion v1 |" in v2 and "Compare the runs in MLflow." in v2
    compare = f"{UI}/#/compare-runs?runs=%5B%22{second.run_id}%22%2C%20%22{first.run_id}%22%5D"
    assert f"[this run beside champion v1's]({compare}" in _artifact(state, "retrain-report").data
    assert client.get_model_version("e2e-model", "1").description.startswith("### e2e-model version 1")

    # a new image in the source is a cache miss: ingest runs and adds exactly that row
    extra = source / "extra.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(extra)
    with open(source / "captions.csv", "a", newline="") as f:
        csv.writer(f).writerow(["extra.png", "the Vexo logo, large, in the centre, on a black background", "Vexo", "circle", "red"])
    third = retrain(str(source), config)
    assert not third.ingest.cached and third.ingest.report.accepted == 1
    assert third.snapshot.rows == n_rows + 1 and not third.captions.cached

    # on demand: the champion evaluated on today's data, in its own run, beside its training-time scores
    from flows.evaluate import evaluate_registered

    state = evaluate_registered("champion", config, return_state=True)
    evaluation = state.result()
    assert evaluation.version == "1"
    run = client.get_run(evaluation.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["evaluated_version"] == "1"
    assert run.data.tags["dataset_snapshot_id"] == third.snapshot.snapshot_id
    assert "overall/grecall" in run.data.metrics
    # beside it, one page with the version's training-time numbers and grids and today's
    (root / "page").mkdir()
    page = open(client.download_artifacts(evaluation.run_id, "compare.html", str(root / "page"))).read()
    assert "e2e-model v1: at training (A) and on today&#x27;s data (B)" in page and first.run_id in page
    assert page.count('src="data:image/png;base64,') == 6  # many, medium and few, A beside B
    report = _artifact(state, "evaluation-report")
    assert report is not None and "| grecall ↑ |" in report.data and "| ↳ at training |" in report.data
    # the reviewer who opens the evaluation run in MLflow reads the same table as its description
    described = client.get_run(evaluation.run_id).data.tags["mlflow.note.content"]
    assert described.startswith("## Evaluation: e2e-model version 1") and "| grecall ↑ |" in described and "| ↳ at training |" in described
    assert "compare.html" in described
