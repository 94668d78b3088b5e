"""The query phase of a full ANN graph build, mapped over row shards on the flow's task runner.

The query phase (every caption searched in the index: ``n x`` one search, the part of a full build
that grows fastest) is what more workers speed up. The driver (the flow's own process) pins the
captions table's version and makes sure the stored index (``storage/ann_index.py``) holds exactly
its captions, building it from the table's vectors when it does not. Each ``query-graph-shard`` task
then reads, on whichever worker runs it, the stored index and its own rows ``start:stop`` of the
table at that version, from storage every worker sees (a shared folder, or object storage behind a
URI), and returns those rows' candidates, ``[rows, L + 1]`` vector ids and cosines: nothing of size
C travels from the driver to a worker. The driver refines the top-k and rho_eff from them
(``neighbours.graph_from_candidates``, about 2.4 s per 1e6 rows on 2 cores) and writes the graph,
which the next index run can update (``pogdiff.ann_graph``) since index and graph match.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
from prefect import get_run_logger, task

from pogdiff import ann_graph, knn
from pogdiff.ann_graph import AnnIndex
from pogdiff.config import IndexConfig
from pogdiff.index import with_graph
from storage import ann_index, caption_rows, vectors
from storage.settings import Settings
from tasks.results import GraphReport, QueryPlan, QueryShard
from tasks.retry import IO_RETRIES

_loaded: dict[tuple[str, str], AnnIndex] = {}  # this worker's index, by store and generation: read once per worker
_loading = threading.Lock()


def plan_query(settings: Settings, cfg: IndexConfig) -> QueryPlan:
    """Pin the captions table's version, make sure the stored index holds its captions, and cut the rows
    into shards of ``cfg.graph_shard_rows``. The plan's ``version``, ``generation`` (of the stored index),
    ``rows``, ``shards`` (``[start, stop]`` pairs) and ``index``: reused, or built and why."""
    uri = settings.lancedb_uri
    version = caption_rows.caption_table_version(uri)
    captions = caption_rows.read_captions(uri, version)
    stored = ann_index.read_ann_index(uri, cfg, load_index=False)
    key = ann_graph.index_key(captions.embedder, cfg)
    if stored is not None and stored[0].key == key and stored[0].holds(captions.ids):
        generation, how = stored[1], "reused"
    else:
        if cfg.knn_engine != "ivf_flat":
            raise ValueError(f"a sharded graph query reads a stored index, and the {cfg.knn_engine} engine's is never stored: "
                             "use index.knn_engine ivf_flat")
        index = knn.build_index(captions.vectors, cfg)
        generation = ann_index.write_ann_index(uri, AnnIndex(index, list(captions.ids), key, len(captions.ids)))
        how = "built: " + ("none stored" if stored is None else "the stored one was made for other captions or settings")
    n, size = len(captions.ids), cfg.graph_shard_rows
    return QueryPlan(version=version, generation=generation, rows=n, index=how,
                     shards=[[start, min(start + size, n)] for start in range(0, n, size)])


def _stored_index(uri: str, generation: str, cfg: IndexConfig) -> AnnIndex:
    with _loading:
        if (uri, generation) not in _loaded:
            stored = ann_index.read_ann_index(uri, cfg)
            if stored is None or stored[1] != generation:
                raise RuntimeError(f"the stored caption index at {uri} changed while the graph was being queried "
                                   "(another index run?): run the rebuild again")
            _loaded.clear()  # one index per worker: the previous generation is dead
            _loaded[(uri, generation)] = stored[0]
        return _loaded[(uri, generation)]


def query_rows(settings: Settings, cfg: IndexConfig, version: int, generation: str, shard: list[int]) -> QueryShard:
    """One shard's candidates: ``ids`` (its caption ids, table order), ``hits`` ``[rows, L + 1]`` vector ids
    of the stored index (-1: none), ``sims`` their cosines, and ``worker`` (host:pid) that searched them."""
    uri = settings.lancedb_uri
    index = _stored_index(uri, generation, cfg)
    ids, x = caption_rows.read_caption_rows(uri, version, shard[0], shard[1])
    hits, sims = knn.search(index.index, x, cfg.ann_candidates + 1)
    return QueryShard(ids=ids, hits=hits, sims=sims, worker=f"{socket.gethostname()}:{os.getpid()}")


def graph_from_shards(settings: Settings, cfg: IndexConfig, plan: QueryPlan, parts: list[QueryShard]) -> GraphReport:
    """Refine the ANN graph of the captions at ``plan.version`` from the shards' candidates and write it."""
    started = time.perf_counter()
    uri = settings.lancedb_uri
    captions = caption_rows.read_captions(uri, plan.version)
    stored = ann_index.read_ann_index(uri, cfg, load_index=False)
    if stored is None or stored[1] != plan.generation:
        raise RuntimeError(f"the stored caption index at {uri} changed while the graph was being queried: run the rebuild again")
    row = {caption: i for i, caption in enumerate(captions.ids)}
    position = np.array([row.get(caption, -1) for caption in stored[0].slots] + [-1], np.int64)  # vector id -> row; -1 -> -1
    width = cfg.ann_candidates + 1
    candidates = np.full((len(captions.ids), width), -1, np.int64)
    sims = np.full((len(captions.ids), width), -np.inf, np.float32)
    for part in parts:
        rows = np.array([row[caption] for caption in part.ids], np.int64)
        candidates[rows, : part.hits.shape[1]] = position[part.hits]
        sims[rows, : part.hits.shape[1]] = part.sims
    graph = with_graph(captions, cfg, candidates, sims)
    report = vectors.write_caption_graph(uri, graph, cfg)
    with _loading:
        _loaded.clear()  # shards run in this process (a thread runner) leave the index here: as large as the vectors
    return GraphReport(captions=len(graph.ids), mode=graph.mode, k=cfg.k, edges=int((graph.nb_index >= 0).sum()),
                       graph_update=f"full: rebuilt, query phase in {len(parts)} shards", index=plan.index,
                       recomputed=len(graph.ids), patched=0, workers=sorted({part.worker for part in parts}),
                       written=report.written, deleted=report.deleted, version=report.version,
                       seconds=round(time.perf_counter() - started, 3))


@task(name="plan-graph-query", **IO_RETRIES)
def plan_graph_query(settings: Settings, cfg: IndexConfig) -> QueryPlan:
    """``plan_query``: the pinned table version, the stored index (built when it is stale), the shards."""
    plan = plan_query(settings, cfg)
    get_run_logger().info("graph query: %d rows in %d shards of at most %d, table version %d, index %s", plan.rows,
                          len(plan.shards), cfg.graph_shard_rows, plan.version, plan.index)
    return plan


@task(name="query-graph-shard", **IO_RETRIES)
def query_graph_shard(settings: Settings, cfg: IndexConfig, version: int, generation: str, shard: list[int]) -> QueryShard:
    """``query_rows`` for one shard, on whichever worker the task runner picks."""
    return query_rows(settings, cfg, version, generation, shard)


@task(name="write-queried-graph", **IO_RETRIES)
def write_queried_graph(settings: Settings, cfg: IndexConfig, plan: QueryPlan, parts: list[QueryShard]) -> GraphReport:
    """``graph_from_shards``: the graph refined from every shard's candidates, written to LanceDB."""
    out = graph_from_shards(settings, cfg, plan, parts)
    get_run_logger().info("graph query: %d captions, %s top-%d graph, %d edges from %d shards on %d workers; %d rows written, "
                          "table version %d", out.captions, out.mode, cfg.k, out.edges, len(parts), len(out.workers),
                          out.written, out.version)
    return out
