"""Evaluate task: generate per individual, score per bucket, log metrics and pictures to the run."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from PIL import Image
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from pogdiff.atomic import write_atomic, write_text_atomic
from pogdiff.config import EvaluateConfig
from pogdiff.demo import detector
from pogdiff.evaluation import EvalResult, RealSet, evaluate
from pogdiff.glossary import HOLDOUT_METRICS
from pogdiff.grids import comparison_grid
from pogdiff.metrics import BUCKETS
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.plots import grecall_scatter, metric_bars, save_png
from storage.mlflow import connection, runs
from storage.settings import Settings
from storage.training_set import load_holdout_set, load_real_set
from tasks.describe import log_glossary

ARTIFACT_DIR = "eval"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    # The task's function also runs outside a flow (``evaluate_model.fn`` in tests and notebooks).
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pogdiff.evaluate")


def _short(name: str, limit: int = 24) -> str:
    # grouped by caption, a row's name is a whole caption: keep the grid's label column narrow
    return name if len(name) <= limit else name[: limit - 3] + "..."


def bucket_title(bucket: str, members: int, cfg: EvaluateConfig, grouped_by: str) -> str:
    """The grid's title: which bucket, how many rows, and the training counts that put them there."""
    many, few = cfg.buckets.many_above, cfg.buckets.few_below
    counts = {"many": f"more than {many}", "medium": f"{few} to {many}", "few": f"fewer than {few}"}[bucket]
    unit = "individual" if grouped_by == "individual" else "caption"
    return f"{bucket} bucket: {members} {unit}{'s' if members != 1 else ''} with {counts} training images"


def _grid(out: Path, name: str, labels: list[str], real: list, generated: list, captions: list[list[str]], title: str) -> None:
    grid = comparison_grid(labels, real, generated, captions, title)
    write_atomic(out / name, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def write_report(result: EvalResult, real: RealSet, cfg: EvaluateConfig, out: Path, holdout: RealSet | None = None) -> list[str]:
    """Write the evaluation's files into ``out``; returns their names.

    ``metrics.json`` (metrics + what they were computed from), ``per_individual.json`` (one row per
    individual: count, bucket, images generated, distinct captions, metrics), ``prompts.json``
    (individual -> the captions its images were generated from, in grid order), ``grid_<bucket>.png``
    (titled by the bucket, one row per individual of the bucket: its name and training count, then
    pairs of a training image and the image generated from its caption, the caption under the
    pair), ``metrics_by_bucket.png`` and ``grecall_vs_count.png``. With held-out photos (``holdout``,
    the set ``result`` was evaluated with) also ``holdout_prompts.json`` and ``holdout_grid_<bucket>.png``,
    the same pairs with a held-out photo and the image generated from its caption, for the individuals
    of the bucket that have held-out photos, and ``holdout_metrics_by_bucket.png``. Every file is
    written atomically with the shared mode (``pogdiff.atomic``): the artifact store copies the
    mode, and reviewers other than the pipeline's user read these files there.
    """
    write_text_atomic(out / "metrics.json", json.dumps({"metrics": result.metrics, "info": result.info}, indent=2, sort_keys=True))
    write_text_atomic(out / "per_individual.json", json.dumps(result.per_individual, indent=2))
    prompts = {row["individual"]: p for row, p in zip(result.per_individual, result.prompts)}
    write_text_atomic(out / "prompts.json", json.dumps(prompts, indent=2))
    if holdout is not None:
        held_prompts = {row["individual"]: p for row, p in zip(result.per_individual, result.holdout_prompts) if p}
        write_text_atomic(out / "holdout_prompts.json", json.dumps(held_prompts, indent=2))
    rows = result.per_individual
    for bucket in BUCKETS:
        # best covered first, so the rows read down the long tail
        members = sorted((i for i, r in enumerate(rows) if r["bucket"] == bucket), key=lambda i: (-rows[i]["count"], rows[i]["individual"]))
        if members:
            counts = [rows[i]["count"] for i in members]
            labels = [f"{_short(real.names[i])}\n{n} training\nimage{'s' if n != 1 else ''}" for i, n in zip(members, counts)]
            _grid(out, f"grid_{bucket}.png", labels, [real.images[result.sources[i]] for i in members],
                  [result.samples[i] for i in members], [result.prompts[i] for i in members],
                  bucket_title(bucket, len(members), cfg, real.grouped_by))
        held_members = [i for i in members if rows[i]["holdout_images"]] if holdout is not None else []
        if held_members:
            labels = [f"{_short(real.names[i])}\n{rows[i]['count']} training,\n{rows[i]['holdout_count']} held out"
                      for i in held_members]
            _grid(out, f"holdout_grid_{bucket}.png", labels, [holdout.images[result.holdout_sources[i]] for i in held_members],
                  [result.holdout_samples[i] for i in held_members], [result.holdout_prompts[i] for i in held_members],
                  f"{bucket_title(bucket, len(held_members), cfg, real.grouped_by)}: held-out photos and their captions' images")
    info = result.info
    title = (f"{info['feature_extractor']} features, N_i in [{info['min_images_per_individual']}, "
             f"{info['max_images_per_individual']}], seed {info['seed']}, gate {info['gate']}, by {info['grouped_by']}")
    # the held-out metrics in a picture of their own: one with every panel would be too tall to read
    held_metrics = {k: v for k, v in result.metrics.items() if k.split("/", 1)[-1] in HOLDOUT_METRICS}
    save_png(metric_bars({k: v for k, v in result.metrics.items() if k not in held_metrics}, title), out / "metrics_by_bucket.png")
    if held_metrics:
        save_png(metric_bars(held_metrics, f"{title}; held-out prompts, copy test by {info['copy_test']}"),
                 out / "holdout_metrics_by_bucket.png")
    save_png(grecall_scatter(result.per_individual, cfg.buckets.many_above, cfg.buckets.few_below), out / "grecall_vs_count.png")
    return sorted(p.name for p in out.iterdir())


@task(name="evaluate")
def evaluate_model(settings: Settings, cfg: EvaluateConfig, model_dir: str, run_id: str, snapshot: str | None = None) -> dict[str, float]:
    """Evaluate against the training images of ``snapshot`` (default: the dataset now) and, where it
    has held-out images, also prompt with their captions (``pogdiff.evaluation.evaluate``). Returns
    ``{"<bucket>/<metric>": value}``; the metrics go to the run, its files under ``eval/``, and what
    each metric means to ``metrics_glossary.json`` / ``.md`` (``pogdiff.glossary``)."""
    log = _logger()
    pipe = load_pipeline(model_dir)  # pixel-space or Stable Diffusion folder, by its layout
    real = load_real_set(settings.dataset_uri, pipe.image_size, cfg.individual_column, snapshot)
    if real.grouped_by == "caption" and cfg.individual_column is not None:
        log.warning("evaluate: the dataset's metadata has no %r key: each distinct caption is its own individual",
                    cfg.individual_column)
    log.info("evaluate: %d real images of %d individuals (grouped by %s)", len(real.images), len(real.names), real.grouped_by)
    holdout = load_holdout_set(settings.dataset_uri, pipe.image_size, cfg.individual_column, snapshot)
    if holdout is not None:
        log.info("evaluate: %d held-out images of %d individuals", len(holdout.images), len(holdout.names))

    # the demo's exact judge and attribute reader: on data they cannot read the judge abstains, and the
    # gate is the nearest-individual test; the copy test falls back to feature similarity
    result = evaluate(pipe, real, cfg, judge=detector.judge, holdout=holdout, attributes=detector.attributes)

    connection.use(settings)
    with runs.resume(run_id), tempfile.TemporaryDirectory() as tmp:
        runs.log_metrics(result.metrics)
        log_glossary(result.metrics)
        write_report(result, real, cfg, Path(tmp), holdout)
        runs.log_artifacts(Path(tmp), ARTIFACT_DIR)
    log.info("evaluate: %s (gate=%s, %d images generated)", {k: round(v, 3) for k, v in result.metrics.items()},
             result.info["gate"], result.info["generated_images"])
    return result.metrics
