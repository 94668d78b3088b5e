"""Tasks that open and close the MLflow run a retrain logs into."""

from __future__ import annotations

import subprocess

from prefect import task
from prefect.runtime import flow_run

from pogdiff.config import RetrainConfig
from storage import parquet, tracking, vectors
from storage.settings import REPO_ROOT, Settings


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@task(name="open-run", retries=2, retry_delay_seconds=[2, 10])
def open_run(settings: Settings, config: RetrainConfig, snapshot_id: str, num_rows: int) -> str:
    """Start the MLflow run: resolved config as params, lineage tags and the dataset as an input."""
    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    versions = vectors.table_versions(settings.lancedb_uri)
    tags = {
        "git_commit": _git_commit(),
        "prefect_flow_run_id": str(flow_run.get_id() or "none"),
        "dataset_snapshot_id": snapshot_id,
        "lancedb_captions_version": str(versions.get(vectors.CAPTIONS, "none")),
        "base_model": config.train.base_model,
        "method": config.train.pog.method,
    }
    run_id = tracking.start(config.registry.experiment, run_name=f"{config.train.pog.method}-{snapshot_id}", tags=tags)
    with tracking.resume(run_id):
        tracking.log_config(config)
        tracking.log_lineage(f"dataset@{snapshot_id}", str(settings.dataset_uri), snapshot_id, "training", num_rows)
    return run_id


@task(name="close-run")
def close_run(settings: Settings, run_id: str, failed: bool) -> None:
    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    tracking.end(run_id, "FAILED" if failed else "FINISHED")
