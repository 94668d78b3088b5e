"""End to end: the retrain flow on a tiny data set, on a real Prefect test server, LanceDB and MLflow."""

import csv

import lancedb
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from prefect import get_client
from prefect.artifacts import Artifact
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from pogdiff.demo import catalogue
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from storage import dataset
from storage.mlflow import connection
from tasks.config import parse_config

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

K = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("e2e")
    source = root / "source"
    summary = catalogue.generate_longtail(source, seed=3, size=16, max_count=8, alpha=1.0, min_count=1)
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


def _task_names(flow_state) -> list[str]:
    return [name for name, _ in _task_runs(flow_state)]


def test_retrain_flow_end_to_end(prefect_server, setup, monkeypatch):
    root, source, summary, config = setup
    home = root / "home"
    monkeypatch.setenv("POGDIFF_HOME", str(home))
    from flows.retrain import retrain

    state = retrain(str(source), config, return_state=True)
    first = state.result()

    # ingest: every row of the captions file landed in Parquet, nothing quarantined
    with open(source / "captions.csv", newline="") as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    assert first["ingest"]["accepted"] == n_rows == summary["images"]
    assert dataset.read_images(home / "dataset", columns=["id"]).num_rows == n_rows
    assert dataset.read_quarantine(home / "dataset").num_rows == 0

    # index: every distinct caption (one per image, mostly) has a vector, k neighbours and a density
    with open(source / "captions.csv", newline="") as f:
        distinct = {row["caption"] for row in csv.DictReader(f)}
    caps = lancedb.connect(str(home / "lancedb")).open_table("captions").to_arrow()
    assert caps.num_rows == len(distinct) == first["captions"]["embedded"] == summary["captions"]
    assert len(distinct) > summary["individuals"]
    ids = set(caps.column("caption_id").to_pylist())
    for row in caps.to_pylist():
        assert len(row["neighbour_ids"]) == K and set(row["neighbour_ids"]) <= ids - {row["caption_id"]}
        assert row["density"] >= row["count"] > 0
    assert first["images"]["computed"] == n_rows
    assert _task_names(state).count("embed-shard") == -(-len(distinct) // 10)  # mapped over the flow's task runner

    # MLflow: a finished run with per-bucket metrics and per-step losses; a version with an alias
    connection.configure(f"sqlite:///{home / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert {"overall/grecall", "overall/accuracy", "few/grecall", "many/grecall"} <= set(run.data.metrics)
    assert len(client.get_metric_history(first["run_id"], "train/loss")) == 3
    assert run.data.params["train.pog.method"] == "pogdiff"
    assert run.data.tags["dataset_snapshot_id"] == first["ingest"]["snapshot_id"]
    assert run.inputs.dataset_inputs, "dataset lineage missing"
    v1 = client.get_model_version("e2e-model", "1")
    assert v1.run_id == first["run_id"]
    model = client.get_registered_model("e2e-model")
    assert model.aliases.get("challenger") in (1, "1") and model.aliases.get("champion") in (1, "1")

    # the run page tells the story: a markdown artifact with the bucket table and the decision
    artifact = Artifact.get("retrain-report")
    assert artifact is not None and "| few | grecall |" in artifact.data and "version 1" in artifact.data
    assert first["run_id"] in artifact.data
    progress = Artifact.get("training-progress")
    assert progress is not None and float(progress.data) == 100.0

    # a second run over unchanged data skips ingest and index (cache hits), but trains a new version
    state = retrain(str(source), config, return_state=True)
    second = state.result()
    assert second["ingest"]["cached"] and second["captions"]["cached"] and second["images"]["cached"]
    assert second["snapshot"] == first["snapshot"]
    states = {name: state_name for name, state_name in _task_runs(state)}
    assert states["ingest"] == states["index-captions"] == states["index-images"] == "Cached", states
    assert states["train"] == states["register"] == "Completed", states
    assert second["run_id"] != first["run_id"]
    assert second["decision"]["version"] == "2"
    assert client.get_registered_model("e2e-model").aliases.get("challenger") in (2, "2")

    # a new image in the source is a cache miss: ingest runs and adds exactly that row
    extra = source / "extra.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(extra)
    with open(source / "captions.csv", "a", newline="") as f:
        csv.writer(f).writerow(["extra.png", "the Vexo logo, large, in the centre, on a black background", "Vexo", "circle", "red"])
    third = retrain(str(source), config)
    assert not third["ingest"]["cached"] and third["ingest"]["accepted"] == 1
    assert third["snapshot"]["rows"] == n_rows + 1 and not third["captions"]["cached"]

    # on demand: the champion evaluated on today's data, in its own run, beside its training-time scores
    from flows.evaluate import evaluate_registered

    evaluation = evaluate_registered("champion", config)
    assert evaluation["version"] == "1"
    run = client.get_run(evaluation["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["evaluated_version"] == "1"
    assert run.data.tags["dataset_snapshot_id"] == third["snapshot"]["snapshot_id"]
    assert "overall/grecall" in run.data.metrics
    # beside it, one page with the version's training-time numbers and grids and today's
    (root / "page").mkdir()
    page = open(client.download_artifacts(evaluation["run_id"], "compare.html", str(root / "page"))).read()
    assert "e2e-model v1: at training (A) and on today&#x27;s data (B)" in page and first["run_id"] in page
    assert page.count('src="data:image/png;base64,') == 6  # many, medium and few, A beside B
    report = Artifact.get("evaluation-report")
    assert report is not None and "| overall | grecall |" in report.data and "at training" in report.data
