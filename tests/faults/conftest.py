"""Fixtures of the fault tests: one real `prefect server start` process for the whole folder, and a
tiny base model, source and retrain config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml
from faultkit import EXPERIMENT, MODEL_NAME, base_env
from localserver import free_port, healthy, wait_for

from pogdiff import demo
from pogdiff.pipelines.pixel import PixelDiffusionPipeline


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """URL of a real Prefect server shared by every fault test (one database migration, not one per run)."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**base_env(), "PREFECT_HOME": str(root)}
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: healthy(api) or server.poll() is not None, 240, "the Prefect server", interval=1)
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_spec):
    """(source folder, config file, number of images): 24 captions, enough images for ingest to take
    a moment, a training long enough to write several checkpoints."""
    root = tmp_path_factory.mktemp("faults-data")
    source = root / "source"
    summary = demo.generate_longtail(source, seed=7, size=64, max_count=40, alpha=1.0, min_count=2, captions="individual")
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
