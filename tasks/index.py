"""Index tasks: caption embeddings + neighbour graph, and per-image features, in LanceDB.

The plain functions are the stage itself (``pogdiff index`` calls them without a flow run); the
tasks wrap them with retries and run logging.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task

from pogdiff import ann_graph
from pogdiff.ann_graph import AnnIndex
from pogdiff.config import IndexConfig
from pogdiff.embedders import embed_captions, make_embedder
from pogdiff.graph_update import update_graph
from pogdiff.index import CaptionGraph, caption_id, embed_caption_counts, image_extractor, image_features, needs_ann, neighbours_of
from storage import ann_index, dataset, vectors
from storage.images import decode_images
from storage.items import SourceError
from storage.settings import Settings
from tasks.results import CaptionIndexReport, ImageFeatureReport
from tasks.retry import IO_RETRIES


def plan_shards(settings: Settings, cfg: IndexConfig, snapshot: str | None = None) -> list[dict[str, str]]:
    """The training captions of the dataset (at ``snapshot``, default now) with no vector under this embedder
    yet, as shards (id -> caption) of at most ``cfg.embed_shard_size``; empty when every caption is
    embedded already."""
    known = vectors.known_vectors(settings.lancedb_uri, make_embedder(cfg).key)
    missing = {i: c for c in dataset.caption_counts(settings.dataset_uri, snapshot) if (i := caption_id(c)) not in known}
    ids = sorted(missing)
    return [{i: missing[i] for i in ids[s : s + cfg.embed_shard_size]} for s in range(0, len(ids), cfg.embed_shard_size)]


def build_caption_index(settings: Settings, cfg: IndexConfig, progress: bool = False,
                        precomputed: dict[str, np.ndarray] | None = None, snapshot: str | None = None) -> CaptionIndexReport:
    """Embed only captions not yet in LanceDB under this embedder, then refresh neighbours and density
    over the training captions of ``snapshot`` (default: the dataset now; ``dataset.caption_counts``:
    a held-out caption is never a neighbour and never adds to a density), and delete captions no
    longer among them from the table. ``version`` in the result is the table version whose rows for those
    captions are exactly this graph.

    Up to ``cfg.ann_threshold`` captions the graph is exact, updated from the stored exact graph when
    there is one (only rows that can change are recomputed: ``pogdiff.graph_update``). Above it an
    all-pairs ANN search supplies candidates and the graph is refined from them; its faiss index is
    stored next to the table (``storage/ann_index.py``), so the next run updates index and graph
    (``pogdiff.ann_graph``) instead of building both anew. ``graph_update`` in the result says which
    happened and, for a full build, why.

    ``precomputed`` (caption id -> vector, e.g. from ``embed_shard`` tasks) counts as embedded by this run.
    """
    started = time.perf_counter()
    counts = dataset.caption_counts(settings.dataset_uri, snapshot)
    if not counts:  # bad input, not a store hiccup: SourceError is never retried (tasks/retry.py)
        raise SourceError(f"the dataset {settings.dataset_uri} has no training images: every input was rejected or held out "
                          "(`pogdiff quarantine` lists why)")
    uri = settings.lancedb_uri
    embedder = make_embedder(cfg)
    precomputed = precomputed or {}
    # the stored exact graph (when it can seed an update) holds every stored vector of this embedder:
    # one read of the table serves both
    previous = vectors.read_caption_graph(uri, embedder.key, cfg)
    stored = dict(zip(previous.ids, previous.vectors)) if previous is not None else vectors.known_vectors(uri, embedder.key)
    known = {**stored, **precomputed}
    graph = embed_caption_counts(counts, known, cfg, embedder, progress)
    if precomputed:
        fresh = len(precomputed.keys() & set(graph.ids))
        graph = replace(graph, embedded=graph.embedded + fresh, reused=graph.reused - fresh)
    ann = None
    if needs_ann(len(graph.ids), cfg):
        graph, ann, update = _ann_graph(uri, graph, previous, cfg)
    elif previous is not None and previous.mode == "exact":
        graph, recomputed = update_graph(graph, previous, cfg)
        update = {"graph_update": "incremental", "recomputed": recomputed, "patched": 0}
    else:
        graph = neighbours_of(graph, cfg)
        update = {"graph_update": "full: no stored exact graph made with these settings", "recomputed": len(graph.ids), "patched": 0}
    report = vectors.write_caption_graph(uri, graph, cfg)
    if ann is not None:  # after the graph: an index newer than the stored graph would not match it, and is rebuilt
        ann_index.write_ann_index(uri, ann)
    return CaptionIndexReport(snapshot_id=snapshot, captions=len(graph.ids), embedded=graph.embedded, reused=graph.reused,
                              embedder=graph.embedder, mode=graph.mode, k=cfg.k, edges=int((graph.nb_index >= 0).sum()), **update,
                              written=report.written, deleted=report.deleted, version=report.version, ann_index=report.ann_index,
                              seconds=round(time.perf_counter() - started, 3))


def _ann_graph(uri: str, graph: CaptionGraph, previous: CaptionGraph | None, cfg: IndexConfig) -> tuple[CaptionGraph, AnnIndex | None, dict]:
    """The ANN graph: updated from the stored graph and index when they allow it (``ann_graph.update_blocker``),
    else built anew. Returns the graph, the index to store (None: unchanged, or an engine that is not
    stored) and how it was made: ``graph_update`` (incremental, or full with the reason), ``recomputed``
    (rows searched and refined) and ``patched`` (rows whose stored top-k or density was patched)."""
    stored = ann_index.read_ann_index(uri, cfg) if previous is not None and previous.mode == "ann" else None
    old = None if stored is None else stored[0]
    blocker = ann_graph.update_blocker(graph, previous, old, cfg)
    if blocker is not None:
        graph, ann = ann_graph.build(graph, cfg)
        return graph, ann, {"graph_update": f"full: {blocker}", "recomputed": len(graph.ids), "patched": 0}
    before = list(old.slots)
    graph, ann, recomputed, patched = ann_graph.update(graph, previous, old, cfg)
    return graph, None if ann.slots == before else ann, {"graph_update": "incremental", "recomputed": recomputed, "patched": patched}


def build_image_features(settings: Settings, cfg: IndexConfig, snapshot: str | None = None) -> ImageFeatureReport:
    """Compute the psi image feature once per training image of ``snapshot`` (default: the dataset
    now; held-out images never enter psi); images already featurised are skipped."""
    extractor = image_extractor(cfg)
    name = extractor.name
    done = vectors.known_feature_ids(settings.lancedb_uri, name)
    table = dataset.read_images(settings.dataset_uri, columns=["id", "image"], snapshot=snapshot, split="train")
    ids = table.column("id").to_pylist()
    new = [i for i, image_id in enumerate(ids) if image_id not in done]
    blobs = table.column("image").take(pa.array(new, pa.int64())).to_pylist()
    feats = image_features(decode_images(blobs, extractor.input_size), extractor)
    report = vectors.write_image_features(settings.lancedb_uri, [ids[i] for i in new], name, feats, cfg.version_retention_days)
    return ImageFeatureReport(snapshot_id=snapshot, extractor=name, computed=len(new), reused=len(ids) - len(new), version=report.version)


@task(name="plan-embedding", **IO_RETRIES)
def plan_embedding(settings: Settings, cfg: IndexConfig, snapshot_id: str | None = None) -> list[dict[str, str]]:
    """``plan_shards``: what the ``embed-shard`` tasks have to embed (nothing on unchanged data)."""
    return plan_shards(settings, cfg, snapshot_id)


@task(name="embed-shard")
def embed_shard(cfg: IndexConfig, captions: dict[str, str]) -> dict[str, np.ndarray]:
    """caption id -> vector for one shard; pure compute, so it runs on any task-runner worker."""
    return embed_captions(make_embedder(cfg), captions, {}, cfg.batch_size).vectors


@task(name="index-captions", **IO_RETRIES)
def index_captions(settings: Settings, cfg: IndexConfig, snapshot_id: str,
                   shards: list[dict[str, np.ndarray]] | None = None) -> CaptionIndexReport:
    """``build_caption_index`` for one dataset snapshot (the snapshot keys the task's cache), taking
    the vectors the ``embed-shard`` tasks computed."""
    out = build_caption_index(settings, cfg, precomputed={k: v for shard in shards or [] for k, v in shard.items()},
                              snapshot=snapshot_id)
    get_run_logger().info(
        "index: %d captions, %d embedded, %d reused; %s top-%d graph (%s), %d edges, %d rows recomputed, %d patched; "
        "%d rows written, %d deleted, table version %d", out.captions, out.embedded, out.reused, out.mode, cfg.k,
        out.graph_update, out.edges, out.recomputed, out.patched, out.written, out.deleted, out.version,
    )
    return out


@task(name="index-images", **IO_RETRIES)
def index_images(settings: Settings, cfg: IndexConfig, snapshot_id: str) -> ImageFeatureReport:
    """``build_image_features`` for one dataset snapshot."""
    out = build_image_features(settings, cfg, snapshot_id)
    get_run_logger().info("index: %d image features computed, %d reused", out.computed, out.reused)
    return out
