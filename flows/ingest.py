"""The ingest flow: ingest a source and refresh the caption index, on an interval (DESIGN §2).

Keeping the dataset and the index fresh between nightly retrains means the retrain itself finds
them cached and goes straight to training. Uses the same cache keys as the retrain flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.prepare import prepare
from flows.runners import task_runner
from storage.settings import load_settings
from tasks.config import RetrainConfig, resolve_config
from tasks.results import Prepared


@flow(name="ingest", log_prints=True, task_runner=task_runner())
def ingest_source(source: str, config: str | RetrainConfig = RetrainConfig(), overrides: dict[str, Any] | None = None) -> Prepared:
    """Ingest ``source`` into the dataset, then embed and index what changed, with the ``ingest`` and
    ``index`` sections of ``config`` (as the retrain flow takes it: the same file gives the same cache keys)."""
    settings = load_settings()
    config = resolve_config(config, overrides, settings.configs_dir)
    return prepare(source, settings, config.ingest, config.index)
