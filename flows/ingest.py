"""The ingest flow: ingest a source and refresh the caption index, on an interval (DESIGN §2).

Keeping the dataset and the index fresh between nightly retrains means the retrain itself finds
them cached and goes straight to training. Uses the same cache keys as the retrain flow.
"""

from __future__ import annotations

from prefect import flow, unmapped

from flows.runners import task_runner
from pogdiff.config import IndexConfig, IngestConfig
from storage.settings import load_settings
from tasks.caching import cached, index_key, ingest_key
from tasks.dataset import dataset_snapshot
from tasks.index import embed_shard, index_captions, index_images, plan_embedding
from tasks.ingest import ingest


@flow(name="ingest", log_prints=True, task_runner=task_runner())
def ingest_source(source: str, ingest_config: IngestConfig = IngestConfig(), index_config: IndexConfig = IndexConfig()) -> dict:
    """Ingest ``source`` into the dataset, then embed and index what changed."""
    settings = load_settings()
    report = cached(ingest, ingest_key, settings)(source, settings, ingest_config)
    snapshot = dataset_snapshot(settings)
    shards = embed_shard.map(unmapped(index_config), plan_embedding(settings, index_config))
    captions = cached(index_captions, index_key, settings)(settings, index_config, snapshot["snapshot_id"], shards)
    images = cached(index_images, index_key, settings)(settings, index_config, snapshot["snapshot_id"])
    return {"ingest": report.model_dump(), "snapshot": snapshot, "captions": captions, "images": images}
