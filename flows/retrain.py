"""The retrain flow: ingest -> index -> train -> evaluate -> register (DESIGN §2)."""

from __future__ import annotations

from prefect import flow, unmapped

from flows.runners import task_runner
from pogdiff.config import RetrainConfig
from pogdiff.trainer import TrainingTimeLimit
from storage.settings import load_settings
from tasks.caching import cached, index_key, ingest_key
from tasks.dataset import dataset_snapshot
from tasks.evaluate import evaluate_model
from tasks.index import embed_shard, index_captions, index_images, plan_embedding
from tasks.ingest import ingest
from tasks.register import register_model
from tasks.report import publish_report
from tasks.track import close_run, open_run
from tasks.train import train_model


def _run(task, *args) -> dict:
    """Call a cached task; its result as a dict with ``cached`` saying whether it was a cache hit."""
    state = task(*args, return_state=True)
    result = state.result()
    data = result.model_dump() if hasattr(result, "model_dump") else dict(result)
    return {**data, "cached": state.name == "Cached"}


@flow(name="retrain", log_prints=True, task_runner=task_runner())
def retrain(source: str, config: RetrainConfig = RetrainConfig()) -> dict:
    """Retrain on ``source``. Locations come from settings; ingest and index are cached by their inputs."""
    settings = load_settings()
    report = _run(cached(ingest, ingest_key, settings), source, settings, config.ingest)
    snapshot = dataset_snapshot(settings)
    shards = embed_shard.map(unmapped(config.index), plan_embedding(settings, config.index))
    captions = _run(cached(index_captions, index_key, settings), settings, config.index, snapshot["snapshot_id"], shards)
    images = _run(cached(index_images, index_key, settings), settings, config.index, snapshot["snapshot_id"])
    run_id = open_run(settings, config, snapshot["snapshot_id"], snapshot["rows"])
    try:
        model_dir = train_model(settings, config.train, config.index, run_id)
        metrics = evaluate_model(settings, config.evaluate, model_dir, run_id)
        decision = register_model(settings, config.registry, model_dir, run_id, metrics)
    except TrainingTimeLimit:
        close_run(settings, run_id, failed=True, resumable=True)  # the next retrain continues this run
        raise
    except BaseException:
        close_run(settings, run_id, failed=True)
        raise
    close_run(settings, run_id, failed=False)
    publish_report(settings, metrics, decision, run_id, snapshot["snapshot_id"])
    return {"ingest": report, "snapshot": snapshot, "captions": captions, "images": images,
            "run_id": run_id, "model_dir": model_dir, "metrics": metrics, "decision": decision}
