"""Register task: log the model to the run, register a version, apply the promotion gate."""

from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task

from pogdiff.config import RegisterConfig
from storage import tracking, vectors
from storage.settings import Settings


@task(name="register", retries=2, retry_delay_seconds=[2, 10])
def register_model(settings: Settings, cfg: RegisterConfig, model_dir: str, run_id: str, metrics: dict[str, float]) -> dict:
    """Returns the promotion decision plus the previous champion's metrics (empty when none)."""
    caps = vectors.read_caption_table(settings.lancedb_uri).sort_by([("count", "descending")])
    example_prompts = caps.column("caption").to_pylist()[:2]
    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    before = tracking.champion(cfg.model_name)
    with tracking.resume(run_id):
        version = tracking.log_model(model_dir, cfg.model_name, example_prompts)
    decision = tracking.promote(cfg.model_name, version, metrics, cfg.gate_metric, cfg.min_improvement)
    get_run_logger().info("register: %s version %s — %s", cfg.model_name, version, decision.reason)
    return {**asdict(decision), "model_name": cfg.model_name, "run_id": run_id,
            "champion_metrics": before[1] if before else {}}
