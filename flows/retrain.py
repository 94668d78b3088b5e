"""The retrain flow: ingest -> index -> train -> evaluate -> register (DESIGN §2)."""

from __future__ import annotations

from prefect import flow

from pogdiff.config import RetrainConfig
from storage.settings import load_settings
from tasks.evaluate import evaluate_model
from tasks.index import index_captions, index_images
from tasks.ingest import ingest
from tasks.register import register_model
from tasks.track import close_run, open_run
from tasks.train import train_model


@flow(name="retrain", log_prints=True)
def retrain(source: str, config: RetrainConfig = RetrainConfig()) -> dict:
    """Retrain on ``source`` (an image folder with a captions file). Locations come from settings."""
    settings = load_settings()
    report = ingest(source, settings, config.ingest)
    captions = index_captions(settings, config.index, report.snapshot_id)
    images = index_images(settings, config.index, report.snapshot_id)
    run_id = open_run(settings, config, report.snapshot_id, report.total_rows)
    try:
        model_dir = train_model(settings, config.train, config.index, run_id)
        metrics = evaluate_model(settings, config.evaluate, model_dir, run_id)
        decision = register_model(settings, config.registry, model_dir, run_id, metrics)
    except BaseException:
        close_run(settings, run_id, failed=True)
        raise
    close_run(settings, run_id, failed=False)
    return {"ingest": report.model_dump(), "captions": captions, "images": images, "run_id": run_id,
            "model_dir": model_dir, "metrics": metrics, "decision": decision}
