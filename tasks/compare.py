"""The comparison page of two evaluated runs: ``pogdiff compare A B --html`` and an artifact of the
evaluate flow (the version at training beside the same version on today's data)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from pogdiff.atomic import write_text_atomic
from pogdiff.compare_page import Side, render
from pogdiff.metrics import BUCKETS
from storage.mlflow import connection, runs, ui
from storage.mlflow.artifacts import read_run_files
from storage.mlflow.references import ResolvedRun, resolve_run
from storage.settings import Settings
from tasks.evaluate import ARTIFACT_DIR
from tasks.results import FetchedModel
from tasks.retry import IO_RETRIES

PAGE_NAME = "compare.html"  # at the top of the evaluation run's artifacts


def describe(r: ResolvedRun) -> tuple[str, str]:
    """(label, detail) of a resolved reference: ``"pogdiff-demo v2"`` or ``"run <id>"``, and where it came from."""
    if r.model:
        return f"{r.model} v{r.version}", f"{r.ref}, run {r.run_id}"
    return f"run {r.run_id}", r.ref


def side(settings: Settings, r: ResolvedRun, label: str, detail: str) -> Side:
    """One side of the page: the run's metrics, its ``eval/grid_<bucket>.png`` files and its MLflow link."""
    connection.use(settings)
    names = [f"grid_{b}.png" for b in BUCKETS]
    with tempfile.TemporaryDirectory() as scratch:
        files = read_run_files(settings.mlflow_tracking_uri, r.run_id, ARTIFACT_DIR, names, Path(scratch))
    grids = {b: files[f"grid_{b}.png"] for b in BUCKETS if f"grid_{b}.png" in files}
    return Side(label, detail, dict(r.metrics), grids, ui.run_link(settings.mlflow_ui_url, r.run_id))


def comparison_page(settings: Settings, a: ResolvedRun, b: ResolvedRun) -> str:
    """The page of ``pogdiff compare A B --html``: A and B as the user named them."""
    (la, da), (lb, db) = describe(a), describe(b)
    return render(f"{la} (A) against {lb} (B)", side(settings, a, la, da), side(settings, b, lb, db))


@task(name="comparison-page", **IO_RETRIES)
def log_comparison_page(settings: Settings, target: FetchedModel, run_id: str, snapshot_id: str) -> str:
    """Log ``compare.html`` to the evaluation run ``run_id``: A = the version ``target`` as its training
    run evaluated it, B = this run's evaluation on snapshot ``snapshot_id``. Returns the artifact path."""
    uri, model = settings.mlflow_tracking_uri, target.model
    label = f"{model} v{target.version}"
    a = side(settings, resolve_run(uri, target.run_id, model), f"{label} at training", f"training run {target.run_id}")
    b = side(settings, resolve_run(uri, run_id, model), f"{label} on snapshot {snapshot_id}", f"evaluation run {run_id}")
    page = render(f"{label}: at training (A) and on today's data (B)", a, b)
    with runs.resume(run_id), tempfile.TemporaryDirectory() as tmp:
        write_text_atomic(Path(tmp) / PAGE_NAME, page)
        runs.log_artifacts(Path(tmp))
    return PAGE_NAME
