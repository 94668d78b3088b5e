"""The retrain flow: ingest -> index -> train -> evaluate -> register (DESIGN §2)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.prepare import prepare
from flows.runners import task_runner
from pogdiff.trainer import TrainingTimeLimit
from storage.settings import load_settings
from tasks.config import RetrainConfig, resolve_config
from tasks.describe import describe_retrain
from tasks.evaluate import evaluate_model
from tasks.register import register_model
from tasks.report import publish_report
from tasks.results import RetrainResult
from tasks.track import close_run, label_flow_run, open_run
from tasks.train import train_model


@flow(name="retrain", log_prints=True, task_runner=task_runner())
def retrain(source: str, config: str | RetrainConfig = RetrainConfig(), overrides: dict[str, Any] | None = None) -> RetrainResult:
    """Retrain on ``source`` (a relative path is under the settings' data_root) with ``config`` (a
    ``RetrainConfig``, or a config file name or path) and ``overrides`` merged on it. Locations come
    from settings; ingest and index are cached by their inputs."""
    settings = load_settings()
    config = resolve_config(config, overrides, settings.configs_dir)
    prepared = prepare(source, settings, config.ingest, config.index)
    data = prepared.data  # what training and evaluation read, and the run records as its lineage
    label_flow_run({"model": config.registry.model_name, "snapshot": data.snapshot_id, "method": config.train.pog.method})
    run_id = open_run(settings, config, data)
    try:
        model_dir = train_model(settings, config.train, config.index, run_id, data, config.evaluate)
        metrics = evaluate_model(settings, config.evaluate, model_dir, run_id, data.snapshot_id)
        decision = register_model(settings, config.registry, model_dir, run_id, metrics)
    except TrainingTimeLimit:
        close_run(settings, run_id, failed=True, resumable=True)  # the next retrain continues this run
        raise
    except BaseException:
        close_run(settings, run_id, failed=True)
        raise
    close_run(settings, run_id, failed=False)
    describe_retrain(settings, config.registry, metrics, decision)
    publish_report(settings, metrics, decision, data.snapshot_id)
    return RetrainResult(**dict(prepared), run_id=run_id, model_dir=model_dir, metrics=metrics, decision=decision)
