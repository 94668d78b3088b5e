"""Tasks of the on-demand evaluation: fetch a registered version, open its evaluation run."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from storage.mlflow import connection, lineage, runs
from storage.mlflow.references import materialize
from storage.settings import Settings
from tasks.config import RetrainConfig
from tasks.results import FetchedModel, Snapshot
from tasks.retry import IO_RETRIES
from tasks.track import EVALUATE_ENTRYPOINT, flow_run_tags, git_commit


@task(name="fetch-model", **IO_RETRIES)
def fetch_model(settings: Settings, model_name: str, ref: str) -> FetchedModel:
    """The version ``ref`` names (alias or version of ``model_name``) as a local model folder."""
    connection.use(settings)
    return FetchedModel(**materialize(settings.mlflow_tracking_uri, ref, model_name, Path(settings.runs_dir) / "registered"))


@task(name="open-evaluation-run", **IO_RETRIES)
def open_evaluation_run(settings: Settings, config: RetrainConfig, target: FetchedModel, snapshot: Snapshot) -> str:
    """A new run in the experiment, tagged with the version it evaluates, the data it used, and
    what ran it (source, user, commit, the Prefect flow run)."""
    connection.use(settings)
    tags = {
        **runs.source_tags(EVALUATE_ENTRYPOINT, git_commit()),
        **flow_run_tags(),
        "kind": "evaluation",
        "evaluated_model": target.model,
        "evaluated_version": target.version,
        "evaluated_run_id": target.run_id,
        "dataset_snapshot_id": snapshot.snapshot_id,
    }
    name = f"evaluate-{target.model}-v{target.version}-{snapshot.snapshot_id}"
    run_id = runs.start(config.registry.experiment, run_name=name, tags=tags)
    with runs.resume(run_id):
        runs.log_config(config.evaluate)
        lineage.log_lineage(f"dataset@{snapshot.snapshot_id}", str(settings.dataset_uri), snapshot.snapshot_id, "evaluation", snapshot.rows)
    return run_id
