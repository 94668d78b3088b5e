"""Index tasks: caption embeddings + neighbour graph, and per-image features, in LanceDB."""

from __future__ import annotations

import pyarrow as pa
from prefect import get_run_logger, task

from pogdiff.config import IndexConfig
from pogdiff.features import make_extractor
from pogdiff.index import build_caption_graph, image_features
from storage import parquet, vectors
from storage.images import decode_images
from storage.settings import Settings


@task(name="index-captions", retries=2, retry_delay_seconds=[2, 10])
def index_captions(settings: Settings, cfg: IndexConfig, snapshot_id: str) -> dict:
    """Embed only captions not yet in LanceDB, then refresh neighbours and density of changed rows."""
    counts = parquet.caption_counts(settings.dataset_uri)
    known = vectors.known_vectors(settings.lancedb_uri)
    graph = build_caption_graph(counts, known, cfg)
    report = vectors.write_caption_graph(settings.lancedb_uri, graph)
    get_run_logger().info(
        "index: %d captions, %d embedded, %d reused, %d rows written, table version %d",
        len(graph.ids), graph.embedded, len(graph.ids) - graph.embedded, report.written, report.version,
    )
    return {"snapshot_id": snapshot_id, "captions": len(graph.ids), "embedded": graph.embedded,
            "written": report.written, "version": report.version}


@task(name="index-images", retries=2, retry_delay_seconds=[2, 10])
def index_images(settings: Settings, cfg: IndexConfig, snapshot_id: str) -> dict:
    """Compute the psi image feature once per image; images already featurised are skipped."""
    name = make_extractor(cfg.image_feature, cfg.image_feature_size).name
    done = vectors.known_feature_ids(settings.lancedb_uri, name)
    table = parquet.read_images(settings.dataset_uri, columns=["id", "image"])
    ids = table.column("id").to_pylist()
    new = [i for i, image_id in enumerate(ids) if image_id not in done]
    blobs = table.column("image").take(pa.array(new, pa.int64())).to_pylist()
    # Pixel features are an area average, so decoding at a multiple of their size loses nothing.
    feats = image_features(decode_images(blobs, 4 * cfg.image_feature_size), cfg)
    report = vectors.write_image_features(settings.lancedb_uri, [ids[i] for i in new], name, feats)
    get_run_logger().info("index: %d image features computed, %d reused", len(new), len(ids) - len(new))
    return {"snapshot_id": snapshot_id, "extractor": name, "computed": len(new), "version": report.version}
