"""Tasks that open and close the MLflow run a retrain logs into."""

from __future__ import annotations

import hashlib
import subprocess

from prefect import task
from prefect.runtime import flow_run

from pogdiff.config import RetrainConfig
from storage import tracking, vectors
from storage.settings import REPO_ROOT, Settings


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _lance_tables(uri: str) -> dict[str, dict]:
    """Per LanceDB table: ``version``, ``rows``, ``uri`` and ``digest``.

    A Lance version is immutable, so (table location, version, commit time) identifies the content;
    the commit time tells a re-created table's version 1 from the old one's.
    """
    db = vectors.connect(uri)
    out = {}
    for name in db.list_tables().tables:
        table = db.open_table(name)
        version = table.version
        committed = next((v["timestamp"] for v in table.list_versions() if v["version"] == version), None)
        key = f"{table.uri}\n{version}\n{committed}"
        out[name] = {"version": version, "rows": table.count_rows(), "uri": table.uri,
                     "digest": hashlib.sha256(key.encode()).hexdigest()[:16]}
    return out


@task(name="open-run", retries=2, retry_delay_seconds=[2, 10])
def open_run(settings: Settings, config: RetrainConfig, snapshot_id: str, num_rows: int) -> str:
    """Start the MLflow run: resolved config as params, lineage tags and the data as inputs.

    Inputs (MLflow datasets): context ``training`` = the Parquet snapshot and the LanceDB tables
    the trainer reads (``captions`` with its neighbour graph, ``image_features``); context
    ``evaluation`` = the captions evaluation prompts are drawn from and the snapshot's real images
    (logged under their own names: MLflow keeps one input per dataset and run).
    """
    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    tables = _lance_tables(settings.lancedb_uri)
    missing = {vectors.CAPTIONS, vectors.IMAGE_FEATURES} - set(tables)
    if missing:
        raise FileNotFoundError(f"LanceDB at {settings.lancedb_uri} has no table {sorted(missing)}; run the index stage first")
    captions, features = tables[vectors.CAPTIONS], tables[vectors.IMAGE_FEATURES]
    tags = {
        "git_commit": _git_commit(),
        "prefect_flow_run_id": str(flow_run.get_id() or "none"),
        "dataset_snapshot_id": snapshot_id,
        "lancedb_captions_version": str(captions["version"]),
        "lancedb_image_features_version": str(features["version"]),
        "base_model": config.train.base_model,
        "method": config.train.pog.method,
    }
    run_id = tracking.start(config.registry.experiment, run_name=f"{config.train.pog.method}-{snapshot_id}", tags=tags)
    dataset = str(settings.dataset_uri)
    with tracking.resume(run_id):
        tracking.log_config(config)
        tracking.log_lineage(f"dataset@{snapshot_id}", dataset, snapshot_id, "training", num_rows)
        for name, t in ((vectors.CAPTIONS, captions), (vectors.IMAGE_FEATURES, features)):
            tracking.log_lineage(f"lancedb/{name}@v{t['version']}", t["uri"], t["digest"], "training", t["rows"])
        tracking.log_lineage(f"eval-captions@lancedb-v{captions['version']}", captions["uri"], captions["digest"],
                             "evaluation", captions["rows"])
        tracking.log_lineage(f"eval-references@{snapshot_id}", dataset, snapshot_id, "evaluation", num_rows)
    return run_id


@task(name="close-run")
def close_run(settings: Settings, run_id: str, failed: bool) -> None:
    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    tracking.end(run_id, "FAILED" if failed else "FINISHED")
