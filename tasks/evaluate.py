"""Evaluate task: generate per caption, score per bucket, log metrics and pictures to the run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import get_run_logger, task

from pogdiff.config import EvaluateConfig
from pogdiff.evaluation import comparison_grid, evaluate
from pogdiff.model import PixelDiffusionPipeline
from storage import parquet, tracking, vectors
from storage.images import decode_images
from storage.settings import Settings


@task(name="evaluate")
def evaluate_model(settings: Settings, cfg: EvaluateConfig, model_dir: str, run_id: str) -> dict[str, float]:
    """Returns ``{"<bucket>/<metric>": value}``; artifacts land under ``eval/`` of the run."""
    pipe = PixelDiffusionPipeline.from_pretrained(model_dir)
    caps = vectors.read_caption_table(settings.lancedb_uri)
    captions = caps.column("caption").to_pylist()
    counts = np.asarray(caps.column("count"), np.int64)
    table = parquet.read_images(settings.dataset_uri, columns=["caption", "image"])
    row = {c: i for i, c in enumerate(captions)}
    real_ids = np.array([row[c] for c in table.column("caption").to_pylist()])
    real = decode_images(table.column("image").to_pylist(), pipe.image_size)

    result = evaluate(pipe, captions, counts, real, real_ids, cfg)

    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    with tracking.resume(run_id), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tracking.log_metrics(result.metrics)
        (out / "metrics.json").write_text(json.dumps({"metrics": result.metrics, "info": result.info}, indent=2, sort_keys=True))
        (out / "per_caption.json").write_text(json.dumps(result.per_caption, indent=2))
        for bucket in ("many", "medium", "few"):
            members = [i for i, r in enumerate(result.per_caption) if r["bucket"] == bucket]
            if members:
                grid = comparison_grid([real[real_ids == i] for i in members], [result.samples[i] for i in members])
                Image.fromarray(grid).save(out / f"grid_{bucket}.png")
        tracking.log_artifacts(out, "eval")
    get_run_logger().info("evaluate: %s (gate=%s)", {k: round(v, 3) for k, v in result.metrics.items()}, result.info["gate"])
    return result.metrics
