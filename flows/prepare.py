"""The stages every flow starts with: ingest -> pinned snapshot -> caption index -> image features.

Called inside a flow (ingest, retrain, tune), not a flow itself: the tasks show in the calling
flow's run.
"""

from __future__ import annotations

from prefect import unmapped

from pogdiff.config import IndexConfig
from storage.config import IngestConfig
from storage.settings import Settings
from storage.training_set import DataVersion
from tasks.caching import cached, index_key, ingest_key
from tasks.dataset import dataset_snapshot
from tasks.index import embed_shard, index_captions, index_images, plan_embedding
from tasks.ingest import ingest
from tasks.results import Cached, CachedCaptionIndex, CachedImageFeatures, CachedIngest, Prepared


def _run(wrap: type[Cached], task, *args) -> Cached:
    """Call a cached task; its report wrapped in ``wrap``, with ``cached`` saying whether it was a cache hit."""
    state = task(*args, return_state=True)
    return wrap(report=state.result(), cached=state.name == "Cached")


def prepare(source: str, settings: Settings, ingest_cfg: IngestConfig, index_cfg: IndexConfig) -> Prepared:
    """Ingest ``source``, pin the dataset snapshot and index it; ingest and index are cached by their inputs.

    Returns ``Prepared``: each stage's report (``cached`` says whether it was a cache hit), the
    snapshot and ``data``, the ``DataVersion`` (snapshot and LanceDB table versions) every later
    stage reads and the run records. A relative ``source`` is under the settings' ``data_root``.
    """
    source = str(settings.source_path(source))
    report = _run(CachedIngest, cached(ingest, ingest_key, settings), source, settings, ingest_cfg)
    snapshot = dataset_snapshot(settings)
    shards = embed_shard.map(unmapped(index_cfg), plan_embedding(settings, index_cfg, snapshot.snapshot_id))
    captions = _run(CachedCaptionIndex, cached(index_captions, index_key, settings), settings, index_cfg, snapshot.snapshot_id, shards)
    images = _run(CachedImageFeatures, cached(index_images, index_key, settings), settings, index_cfg, snapshot.snapshot_id)
    data = DataVersion(snapshot_id=snapshot.snapshot_id, rows=snapshot.rows, captions_version=captions.report.version,
                       features_version=images.report.version)
    return Prepared(ingest=report, snapshot=snapshot, captions=captions, images=images, data=data)
