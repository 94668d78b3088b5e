"""Shared fixtures: tiny random models and data, and an isolated home for every store."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The test server's telemetry writes race the flow's writes on its SQLite file ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402

from pogdiff.pipelines.pixel import UNetSpec  # noqa: E402

TINY = UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)


@pytest.fixture(scope="session")
def tiny_spec() -> UNetSpec:
    return TINY
