"""Evaluate task: generate per caption, score per bucket, log metrics and pictures to the run."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from pogdiff.config import EvaluateConfig
from pogdiff.evaluation import EvalResult, comparison_grid, evaluate
from pogdiff.metrics import BUCKETS
from pogdiff.model import load_pipeline
from pogdiff.plots import grecall_scatter, metric_bars, save_png
from storage import parquet, tracking, vectors
from storage.images import decode_images
from storage.settings import Settings

ARTIFACT_DIR = "eval"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    # The task's function also runs outside a flow (``evaluate_model.fn`` in tests and notebooks).
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pogdiff.evaluate")


def write_report(result: EvalResult, real: np.ndarray, real_ids: np.ndarray, cfg: EvaluateConfig, out: Path) -> list[str]:
    """Write the evaluation's files into ``out``; returns their names.

    ``metrics.json`` (metrics + what they were computed from), ``per_caption.json``,
    ``grid_<bucket>.png`` (real images left, generated right, one row per caption),
    ``metrics_by_bucket.png`` and ``grecall_vs_count.png``.
    """
    (out / "metrics.json").write_text(json.dumps({"metrics": result.metrics, "info": result.info}, indent=2, sort_keys=True))
    (out / "per_caption.json").write_text(json.dumps(result.per_caption, indent=2))
    for bucket in BUCKETS:
        members = [i for i, r in enumerate(result.per_caption) if r["bucket"] == bucket]
        if members:
            grid = comparison_grid([real[real_ids == i] for i in members], [result.samples[i] for i in members])
            Image.fromarray(grid).save(out / f"grid_{bucket}.png")
    info = result.info
    title = f"{info['feature_extractor']} features, N={info['images_per_caption']}, seed {info['seed']}, gate {info['gate']}"
    save_png(metric_bars(result.metrics, title), out / "metrics_by_bucket.png")
    save_png(grecall_scatter(result.per_caption, cfg.buckets.many_above, cfg.buckets.few_below), out / "grecall_vs_count.png")
    return sorted(p.name for p in out.iterdir())


@task(name="evaluate")
def evaluate_model(settings: Settings, cfg: EvaluateConfig, model_dir: str, run_id: str) -> dict[str, float]:
    """Returns ``{"<bucket>/<metric>": value}``; the metrics go to the run, its files under ``eval/``."""
    pipe = load_pipeline(model_dir)  # pixel-space or Stable Diffusion folder, by its layout
    caps = vectors.read_caption_table(settings.lancedb_uri)
    if caps is None:
        raise FileNotFoundError(f"no caption table in {settings.lancedb_uri}: run the index stage first")
    captions = caps.column("caption").to_pylist()
    counts = np.asarray(caps.column("count"), np.int64)
    table = parquet.read_images(settings.dataset_uri, columns=["caption", "image"])
    row = {c: i for i, c in enumerate(captions)}
    real_ids = np.array([row[c] for c in table.column("caption").to_pylist()])
    real = decode_images(table.column("image").to_pylist(), pipe.image_size)

    result = evaluate(pipe, captions, counts, real, real_ids, cfg)

    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    with tracking.resume(run_id), tempfile.TemporaryDirectory() as tmp:
        tracking.log_metrics(result.metrics)
        write_report(result, real, real_ids, cfg, Path(tmp))
        tracking.log_artifacts(Path(tmp), ARTIFACT_DIR)
    _logger().info("evaluate: %s (gate=%s)", {k: round(v, 3) for k, v in result.metrics.items()}, result.info["gate"])
    return result.metrics
