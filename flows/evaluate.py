"""The evaluate flow: a registered version (the champion by default) on the current data, on demand.

Answers "is the model in production still good on today's data?" without training: a new MLflow
run tagged with the version it evaluates, the per-bucket metrics and pictures of the evaluate
stage, ``compare.html`` in that run (the version's training-time metrics and grids beside today's,
side by side), and a markdown artifact comparing the numbers with what the version scored when it
was trained.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from storage.settings import load_settings
from tasks.compare import log_comparison_page
from tasks.config import RetrainConfig, resolve_config
from tasks.dataset import dataset_snapshot
from tasks.evaluate import evaluate_model
from tasks.registry import fetch_model, open_evaluation_run
from tasks.report import publish_evaluation_report
from tasks.results import EvaluationResult
from tasks.track import close_run


@flow(name="evaluate", log_prints=True)
def evaluate_registered(model: str = "champion", config: str | RetrainConfig = RetrainConfig(),
                        overrides: dict[str, Any] | None = None) -> EvaluationResult:
    """Evaluate ``model`` (an alias or version of ``config.registry.model_name``, or ``name@alias``);
    ``config`` and ``overrides`` as the retrain flow takes them."""
    settings = load_settings()
    config = resolve_config(config, overrides, settings.configs_dir)
    target = fetch_model(settings, config.registry.model_name, model)
    snapshot = dataset_snapshot(settings)
    run_id = open_evaluation_run(settings, config, target, snapshot)
    try:
        metrics = evaluate_model(settings, config.evaluate, target.model_dir, run_id, snapshot.snapshot_id)
        log_comparison_page(settings, target, run_id, snapshot.snapshot_id)
    except BaseException:
        close_run(settings, run_id, failed=True)
        raise
    close_run(settings, run_id, failed=False)
    publish_evaluation_report(settings, metrics, target, run_id, snapshot.snapshot_id)
    return EvaluationResult(run_id=run_id, model=target.model, version=target.version, metrics=metrics,
                            at_training={k: v for k, v in target.metrics.items() if k in metrics})
