"""Train task: fine-tune the base model on the indexed dataset with the configured objective."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import get_run_logger, task

from pogdiff.config import IndexConfig, TrainConfig
from pogdiff.features import make_extractor
from pogdiff.model import load_pipeline, to_tensor
from pogdiff.neighbours import NeighbourGraph
from pogdiff.trainer import TrainData, train
from storage import tracking
from storage.settings import Settings
from storage.training_set import load_training_set


def run_dir(settings: Settings, run_id: str) -> Path:
    return Path(settings.runs_dir) / run_id


# Never cached or retried by Prefect: a retry would restart a long job; resume comes from checkpoints.
@task(name="train")
def train_model(settings: Settings, cfg: TrainConfig, index_cfg: IndexConfig, run_id: str) -> str:
    """Returns the path of the fine-tuned model folder."""
    log = get_run_logger()
    pipe = load_pipeline(cfg.base_model)  # pixel or Stable Diffusion, by the folder's layout
    extractor = make_extractor(index_cfg.image_feature, index_cfg.image_feature_size).name
    stored = load_training_set(settings.dataset_uri, settings.lancedb_uri, extractor, pipe.image_size)
    graph = NeighbourGraph.build(
        torch.from_numpy(stored.caption_of),
        torch.from_numpy(stored.nb_index),
        torch.from_numpy(stored.nb_sims),
        torch.from_numpy(stored.density),
        torch.from_numpy(stored.features),
    )
    data = TrainData(to_tensor(stored.images), stored.captions, graph)
    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    every = max(1, cfg.steps // 20)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if step % every == 0 or step == cfg.steps:
            log.info("train step %d/%d loss %.4f", step, cfg.steps, metrics["loss"])

    with tracking.resume(run_id):
        result = train(pipe, data, cfg, run_dir(settings, run_id), on_step=on_step)
        tracking.log_metrics({"train/seconds": result.seconds})
    if result.resumed_from:
        log.info("train: resumed from checkpoint at step %d", result.resumed_from)
    log.info("train: %d steps of %s in %.1f s", result.steps, cfg.pog.method, result.seconds)
    return str(result.model_dir)
