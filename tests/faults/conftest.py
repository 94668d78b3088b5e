"""Fixtures of the fault tests: a tiny base model, source and retrain config (the Prefect server is
the session's, tests/conftest.py)."""

from __future__ import annotations

import pytest
import yaml
from faultkit import EXPERIMENT, MODEL_NAME

from pogdiff.demo import folder
from pogdiff.pipelines.pixel import PixelDiffusionPipeline


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_spec):
    """(source folder, config file, number of images): 24 captions, enough images for ingest to take
    a moment, a training long enough to write several checkpoints."""
    root = tmp_path_factory.mktemp("faults-data")
    source = root / "source"
    # no held-out photos: the fault tests count the images a source holds against what every stage kept
    summary = folder.generate_longtail(source, seed=7, size=64, max_count=40, alpha=1.0, min_count=2, captions="individual", holdout=0)
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(root / "base")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "ingest": {"resolution": 32},
        "index": {"k": 3},
        "train": {"base_model": str(root / "base"), "steps": 40, "batch_size": 8, "checkpoint_every": 4},
        "evaluate": {"min_images_per_individual": 1, "max_images_per_individual": 2, "num_inference_steps": 2, "buckets": {"many_above": 10, "few_below": 4}},
        "registry": {"experiment": EXPERIMENT, "model_name": MODEL_NAME},
    }))
    return source, config, summary["images"]
