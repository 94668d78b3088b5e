"""All-pairs approximate nearest neighbours: the candidate lists of the caption graph above
``IndexConfig.ann_threshold`` captions.

Below the threshold the graph is exact (``neighbours.exact_graph``, blockwise torch, on the GPU when
there is one). Above it an index made for all-pairs search proposes each caption's ``ann_candidates``
nearest rows with their cosines (exact: the index stores the vectors uncompressed), and
``neighbours.graph_from_candidates`` picks the top-k and sums the density from them, so only the
candidate *set* is approximate.

Engine, chosen by measurement (bench/knn_graph.py, 2 cores, 1e5 clustered 384-d vectors, 51 hits per
query): faiss IVF-Flat built in 7.8 s and searched all rows in 10.2 s at recall@10 0.9996 (idle
machine); faiss HNSW (M = 32) took about 26 s + 26 s at 0.9998 and LanceDB's IVF_HNSW_SQ table index
50 s + 98 s, its per-query overhead dominating (both on a busier machine). LanceDB stays the store of
the vectors and of the graph, not its search engine.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import numpy as np

from pogdiff.config import IndexConfig

# k-means of the IVF coarse quantiser is trained on at most this many vectors per list (faiss warns
# below 39); more would only slow training down.
TRAIN_PER_LIST = 64


def ivf_lists(n: int, cfg: IndexConfig) -> int:
    """Inverted lists of the IVF index: ``cfg.ivf_lists``, or 4 sqrt(n) (faiss' rule of thumb), at most n / 39."""
    lists = cfg.ivf_lists or int(4 * math.sqrt(n))
    return max(1, min(lists, n // 39))


def build_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0):
    """A faiss inner-product index over ``vectors`` ``[C, D]`` (float32, L2-normalised: inner product =
    cosine), as ``cfg.knn_engine`` names it: ``ivf_flat`` (k-means lists, exact distances within the
    ``cfg.ivf_nprobe`` lists nearest a query) or ``hnsw`` (a navigable graph, no training)."""
    import faiss  # imported here: only caption sets above the threshold need it

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    if cfg.knn_engine == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        index.add(x)
        index.hnsw.efSearch = max(64, cfg.ann_candidates + 1)
        return index
    lists = ivf_lists(n, cfg)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_LIST * lists), replace=False)
    index.cp.seed = seed  # k-means starts from a seeded draw: the same vectors give the same graph
    index.train(x[np.sort(sample)])
    index.add(x)
    index.nprobe = min(cfg.ivf_nprobe, lists)
    return index


def search(index, queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` nearest rows of ``index`` for each query ``[Q, D]``: row indices ``[Q, width]``
    int64 (-1 where fewer hits came back) and their inner products ``[Q, width]`` float32, nearest first.
    Flat storage makes the inner products exact, so the graph's refinement need not recompute them."""
    sims, hits = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(width, index.ntotal))
    return hits.astype(np.int64), sims


def ann_candidates(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The approximate ``cfg.ann_candidates`` + 1 nearest rows of every row of ``vectors`` ``[C, D]``
    and their cosines (``build_index`` over all rows, then ``search`` with each): ``[C, L + 1]`` each,
    nearest first. A row is usually its own first hit (hence the + 1); ``graph_from_candidates`` drops it."""
    return search(build_index(vectors, cfg, seed), vectors, cfg.ann_candidates + 1)


def write_index(index, handle: BinaryIO) -> None:
    """Stream the index in faiss' own format into ``handle`` (anything with ``write(bytes)``), with no
    copy of it in memory (``faiss.serialize_index`` makes two, which took longer than the disk)."""
    import faiss

    faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))


def read_index(handle: BinaryIO, cfg: IndexConfig):
    """An index streamed from ``handle`` (``write_index``'s output, from its current position), searched
    with ``cfg``'s nprobe (a search-time setting)."""
    import faiss

    index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
    if hasattr(index, "nprobe"):
        index.nprobe = min(cfg.ivf_nprobe, index.nlist)
    return index
