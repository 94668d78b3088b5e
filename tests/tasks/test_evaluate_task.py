"""The evaluate task on a tiny model against real stores: Parquet dataset, SQLite MLflow."""

import json
import os
import stat
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pogdiff.config import EvaluateConfig, parse_config
from pogdiff.demo import folder
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from storage import parquet
from storage.config import IngestConfig
from storage.mlflow import connection, runs
from storage.settings import load_settings
from storage.training_set import load_holdout_set, load_real_set
from tasks.evaluate import ARTIFACT_DIR, evaluate_model


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("evaluate")
    settings = load_settings(home=root / "home")
    source = root / "source"
    # 24 individuals with 8, 4, 3, 2, 2 and 19 x 1 training images (38), each image with its own caption,
    # and 4 held-out photos each (96)
    summary = folder.generate_longtail(source, seed=3, size=16, max_count=8, alpha=1.0, min_count=1)
    parquet.ingest(source, settings.dataset_uri, IngestConfig(), workers=1)
    model_dir = root / "model"
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(model_dir)
    return settings, model_dir, summary


def test_real_set_groups_by_the_individual_column_or_falls_back_to_captions(stores):
    settings, _, summary = stores
    by_individual = load_real_set(settings.dataset_uri, 16, "individual")
    assert by_individual.grouped_by == "individual" and by_individual.images.shape == (38, 16, 16, 3)
    assert dict(zip(by_individual.names, by_individual.counts.tolist())) == summary["counts"]
    by_caption = load_real_set(settings.dataset_uri, 16, "brand")  # no such metadata key
    assert by_caption.grouped_by == "caption" and len(by_caption.names) == summary["captions"]
    assert by_caption.names == sorted(set(by_caption.captions))
    # the held-out photos are none of them: read apart, grouped under the same names
    holdout = load_holdout_set(settings.dataset_uri, 16, "individual")
    assert holdout.names == by_individual.names and holdout.counts.tolist() == [4] * 24 == [summary["holdout"] // 24] * 24
    assert not set(holdout.captions) & set(by_individual.captions)


def test_evaluate_task_logs_metrics_grids_plots_and_json(stores, tmp_path):
    settings, model_dir, summary = stores
    cfg = parse_config({"min_images_per_individual": 1, "max_images_per_individual": 2, "num_inference_steps": 2,
                        "buckets": {"many_above": 5, "few_below": 3}}, EvaluateConfig)
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    run_id = runs.start("evaluate-task")

    # under an owner-only umask a plain open() or Image.save() makes 0600 files: every file of the
    # evaluation must still reach the artifact store readable by the reviewers
    umask = os.umask(0o077)
    try:
        metrics = evaluate_model.fn(settings, cfg, str(model_dir), run_id)
    finally:
        os.umask(umask)

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the task logs into the flow's run, it does not end it
    assert {"overall/grecall", "few/grecall", "few/grecall_norm", "overall/accuracy", "overall/nearest_accuracy",
            "overall/similarity", "overall/frechet_pixels16"} <= set(metrics)
    assert run.data.metrics == pytest.approx(metrics)

    names = sorted(Path(a.path).name for a in client.list_artifacts(run_id, ARTIFACT_DIR))
    grids = [n for n in names if n.startswith("grid_")]
    assert set(grids) == {"grid_many.png", "grid_medium.png", "grid_few.png"}
    assert {"metrics.json", "per_individual.json", "prompts.json", "metrics_by_bucket.png", "grecall_vs_count.png"} <= set(names)
    # the held-out photos' captions prompted images too, scored per bucket, in grids and a plot of their own
    assert {f"{b}/{m}" for b in ("many", "medium", "few", "overall")
            for m in ("holdout_accuracy", "holdout_grecall", "prompt_fidelity", "copy_rate")} <= set(metrics)
    assert {"holdout_prompts.json", "holdout_metrics_by_bucket.png", "holdout_grid_many.png", "holdout_grid_medium.png",
            "holdout_grid_few.png"} <= set(names)

    stored = Path(urlparse(run.info.artifact_uri).path) / ARTIFACT_DIR
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in stored.iterdir()} == {n: 0o644 for n in names}

    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_DIR, dst_path=str(tmp_path)))
    saved = json.loads((local / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics)
    info = saved["info"]
    assert info["gate"] == "judge" and info["feature_extractor"] == "pixels16" and info["grouped_by"] == "individual"
    assert (info["min_images_per_individual"], info["max_images_per_individual"], info["seed"]) == (1, 2, cfg.seed)
    # N_i = max(1, min(|T_i|, 2)): 2 for the five individuals with 2 or more images, 1 for the other 19
    assert info["generated_images"] == 5 * 2 + 19
    assert "frechet_pixels16.overall" in info and "few/grecall" in info["gate_metric_note"]
    # M_i = max(1, |H_i|) = 4 images from the held-out captions of each individual; the demo's reader reads them
    assert (info["holdout_photos"], info["holdout_generated_images"], info["holdout_individuals"]) == (96, 96, 24)
    assert info["copy_test"] == "attributes" and info["holdout_unreadable_photos"] == 0
    rows = json.loads((local / "per_individual.json").read_text())
    assert {r["individual"]: r["count"] for r in rows} == summary["counts"]
    assert [r["bucket"] for r in rows if r["count"] == 8] == ["many"]
    prompts = json.loads((local / "prompts.json").read_text())
    held_prompts = json.loads((local / "holdout_prompts.json").read_text())
    for r in rows:  # each individual's images were asked for with captions of its own training images
        assert len(prompts[r["individual"]]) == r["images"] == min(r["count"], 2)
        assert all(f"{r['individual']} logo" in p for p in prompts[r["individual"]])
        # and with its four held-out captions, each once, none a training caption
        assert len(set(held_prompts[r["individual"]])) == r["holdout_images"] == r["holdout_count"] == 4
        assert all(f"{r['individual']} logo" in p for p in held_prompts[r["individual"]])
        assert not set(held_prompts[r["individual"]]) & set(prompts[r["individual"]])
    # one row of 64-pixel cells (16 pixels scaled up 4x) and captions per individual, under a title and header;
    # every individual has held-out photos, so each held-out grid has as many rows as its bucket's grid
    for name in grids + [f"holdout_{g}" for g in grids]:
        members = sum(r["bucket"] == name.rsplit("_", 1)[1][:-4] for r in rows)
        with Image.open(local / name) as im:
            assert im.format == "PNG" and members * 74 < im.size[1] <= members * 120 + 80 and im.size[0] <= 1000
    for name in ("metrics_by_bucket.png", "holdout_metrics_by_bucket.png", "grecall_vs_count.png"):
        with Image.open(local / name) as im:
            assert im.format == "PNG" and 200 < min(im.size) and max(im.size) <= 1000
