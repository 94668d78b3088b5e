"""The stages every training flow starts with: ingest -> snapshot -> caption index -> image features.

Called inside a flow (retrain, tune), not a flow itself: the tasks show in the calling flow's run.
"""

from __future__ import annotations

from prefect import unmapped

from pogdiff.config import RetrainConfig
from storage.settings import Settings
from tasks.caching import cached, index_key, ingest_key
from tasks.dataset import dataset_snapshot
from tasks.index import embed_shard, index_captions, index_images, plan_embedding
from tasks.ingest import ingest


def _run(task, *args) -> dict:
    """Call a cached task; its result as a dict with ``cached`` saying whether it was a cache hit."""
    state = task(*args, return_state=True)
    result = state.result()
    data = result.model_dump() if hasattr(result, "model_dump") else dict(result)
    return {**data, "cached": state.name == "Cached"}


def prepare(source: str, settings: Settings, config: RetrainConfig) -> dict:
    """Ingest ``source`` and index the resulting snapshot; ingest and index are cached by their inputs.

    Returns ``{"ingest", "snapshot", "captions", "images"}``: each stage's report (``cached`` says
    whether it was a cache hit) and the snapshot (``snapshot_id``, ``rows``) the later stages record.
    """
    report = _run(cached(ingest, ingest_key, settings), source, settings, config.ingest)
    snapshot = dataset_snapshot(settings)
    shards = embed_shard.map(unmapped(config.index), plan_embedding(settings, config.index))
    captions = _run(cached(index_captions, index_key, settings), settings, config.index, snapshot["snapshot_id"], shards)
    images = _run(cached(index_images, index_key, settings), settings, config.index, snapshot["snapshot_id"])
    return {"ingest": report, "snapshot": snapshot, "captions": captions, "images": images}
