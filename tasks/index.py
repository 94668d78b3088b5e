"""Index tasks: caption embeddings + neighbour graph, and per-image features, in LanceDB.

The plain functions are the stage itself (``pogdiff index`` calls them without a flow run); the
tasks wrap them with retries and run logging.
"""

from __future__ import annotations

import time

import pyarrow as pa
from prefect import get_run_logger, task

from pogdiff.config import IndexConfig
from pogdiff.embedders import make_embedder
from pogdiff.features import make_extractor
from pogdiff.index import embed_caption_counts, image_features, needs_ann, with_graph
from storage import parquet, vectors
from storage.images import decode_images
from storage.settings import Settings


def build_caption_index(settings: Settings, cfg: IndexConfig, progress: bool = False) -> dict:
    """Embed only captions not yet in LanceDB under this embedder, then refresh neighbours and density.

    Up to ``cfg.ann_threshold`` captions the graph is exact; above it the vectors are written first,
    the table's ANN index supplies candidates, and the graph is refined from them.
    """
    started = time.perf_counter()
    uri = settings.lancedb_uri
    embedder = make_embedder(cfg)
    graph = embed_caption_counts(parquet.caption_counts(settings.dataset_uri), vectors.known_vectors(uri, embedder.key),
                                 cfg, embedder, progress)
    if needs_ann(len(graph.ids), cfg):
        vectors.write_caption_vectors(uri, graph, cfg)
        graph = with_graph(graph, cfg, vectors.ann_candidates(uri, graph.ids, graph.vectors, cfg))
    else:
        graph = with_graph(graph, cfg)
    report = vectors.write_caption_graph(uri, graph, cfg)
    return {"captions": len(graph.ids), "embedded": graph.embedded, "reused": graph.reused, "embedder": graph.embedder,
            "mode": graph.mode, "k": cfg.k, "edges": int((graph.nb_index >= 0).sum()), "written": report.written,
            "version": report.version, "ann_index": report.ann_index, "seconds": round(time.perf_counter() - started, 3)}


def build_image_features(settings: Settings, cfg: IndexConfig) -> dict:
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
    return {"extractor": name, "computed": len(new), "reused": len(ids) - len(new), "version": report.version}


@task(name="index-captions", retries=2, retry_delay_seconds=[2, 10])
def index_captions(settings: Settings, cfg: IndexConfig, snapshot_id: str) -> dict:
    """``build_caption_index`` for one dataset snapshot (the snapshot keys the task's cache)."""
    out = build_caption_index(settings, cfg)
    get_run_logger().info(
        "index: %d captions, %d embedded, %d reused; %s top-%d graph, %d edges; %d rows written, table version %d",
        out["captions"], out["embedded"], out["reused"], out["mode"], cfg.k, out["edges"], out["written"], out["version"],
    )
    return {"snapshot_id": snapshot_id, **out}


@task(name="index-images", retries=2, retry_delay_seconds=[2, 10])
def index_images(settings: Settings, cfg: IndexConfig, snapshot_id: str) -> dict:
    """``build_image_features`` for one dataset snapshot."""
    out = build_image_features(settings, cfg)
    get_run_logger().info("index: %d image features computed, %d reused", out["computed"], out["reused"])
    return {"snapshot_id": snapshot_id, **out}
