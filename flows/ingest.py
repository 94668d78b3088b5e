"""The ingest flow: ingest a source and refresh the caption index, on an interval (DESIGN §2).

Keeping the dataset and the index fresh between nightly retrains means the retrain itself finds
them cached and goes straight to training. Uses the same cache keys as the retrain flow.
"""

from __future__ import annotations

from prefect import flow

from flows.prepare import prepare
from flows.runners import task_runner
from pogdiff.config import IndexConfig
from storage.config import IngestConfig
from storage.settings import load_settings


@flow(name="ingest", log_prints=True, task_runner=task_runner())
def ingest_source(source: str, ingest_config: IngestConfig = IngestConfig(), index_config: IndexConfig = IndexConfig()) -> dict:
    """Ingest ``source`` into the dataset, then embed and index what changed."""
    settings = load_settings()
    prepared = prepare(source, settings, ingest_config, index_config)
    return {**prepared, "data": prepared["data"].model_dump()}
