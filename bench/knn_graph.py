"""The caption neighbour graph at scale: exact blockwise torch search against the LanceDB ANN path.

    python -m bench.knn_graph [--quick] [--k 10] [--sizes 10000 100000]

Data: clustered, L2-normalised 384-d vectors (the MiniLM dimension; about 20 captions per cluster,
as paraphrases and attribute variants of one subject form clusters in real caption sets), with
random training counts. For each n:

- ``exact``: ``pogdiff.neighbours.exact_graph`` (top-k and rho_eff in one pass), what the index stage
  runs up to ``ann_threshold``. Above 1e5 it is run on a sample of query rows only and its time is
  extrapolated (``extrapolated: true``, ``sampled_rows``).
- ``ann``: the index stage's ANN path: vectors written to a temporary LanceDB table, the cosine
  ANN index built (``index_seconds``, included in ``seconds``), every caption's candidates searched
  and the graph refined from them; ``recall_at_k`` against the exact top-k. Above 1e5 the table and
  index hold all n rows, but only the sampled query rows are searched and refined: ``search_seconds``
  is extrapolated to n queries and ``seconds`` = index_seconds + that.

Prints one JSON document with the figures and the goal they are compared with: n = 1e5, k = 10 in
at most 120 s (exact, 2 cores) and ANN recall@10 at least 0.95. ``--quick``: n = 1e4 and 1e5 (the goal's
size; about 3 minutes on 2 cores); the full run adds 1e6.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch

from pogdiff.config import IndexConfig
from pogdiff.index import CaptionGraph, with_graph
from pogdiff.neighbours import exact_graph, graph_from_candidates
from storage import vectors

GOAL = {"n": 100_000, "k": 10, "max_seconds": 120.0, "min_recall_at_k": 0.95}
DIM = 384
EXACT_SAMPLE = 4096  # query rows timed (exact and ANN) where searching all n rows is too long to run
SAMPLE_BLOCK = 256


def clustered(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[n, 384]`` unit vectors around n / 20 random centres, and counts ``[n]`` in 1..30."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 20, 1), DIM)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, rng.integers(1, 31, n)


def _exact(x: np.ndarray, counts: np.ndarray, k: int, bandwidth: float, full: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """Exact top-k of every row (or of the first EXACT_SAMPLE rows, time extrapolated); ids and query rows."""
    v, n = torch.from_numpy(x), torch.from_numpy(counts)
    if full:
        start = time.perf_counter()
        ids, _, _ = exact_graph(v, n, k, bandwidth)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "extrapolated": False}, ids.numpy(), np.arange(len(x))
    rows = np.arange(min(EXACT_SAMPLE, len(x)))  # the rows are in random order: the first ones are a sample
    ids = np.empty((len(rows), k), np.int64)
    start = time.perf_counter()
    for b in range(0, len(rows), SAMPLE_BLOCK):  # blocks keep the [b, n] similarity matrix at ~1 GB for n = 1e6
        r = torch.from_numpy(rows[b : b + SAMPLE_BLOCK])
        s = v[r] @ v.T
        s[torch.arange(len(r)), r] = float("-inf")
        ids[b : b + len(r)] = s.topk(k, dim=1).indices.numpy()
    seconds = (time.perf_counter() - start) * len(x) / len(rows)
    return {"seconds": seconds, "extrapolated": True, "sampled_rows": len(rows)}, ids, rows


def _ann(x: np.ndarray, counts: np.ndarray, cfg: IndexConfig, uri: str, rows: np.ndarray) -> tuple[dict, np.ndarray]:
    """The ANN graph of the query ``rows`` (all rows, or the leading sample) against a table of every row."""
    n = len(x)
    ids = [f"{i:08d}" for i in range(n)]
    graph = CaptionGraph(ids=ids, captions=ids, vectors=x, counts=counts, nb_index=np.zeros((n, 0), np.int64),
                         nb_sims=np.zeros((n, 0), np.float32), density=counts.astype(np.float64), embedded=n,
                         embedder="bench", mode="none")
    start = time.perf_counter()
    report = vectors.write_caption_vectors(uri, graph, cfg)
    index_seconds = time.perf_counter() - start
    if not report.ann_index:
        raise RuntimeError(f"no ANN index was built on {n} rows with ann_threshold {cfg.ann_threshold}")
    start = time.perf_counter()
    if len(rows) == n:
        nb_index = with_graph(graph, cfg, vectors.ann_candidates(uri, ids, x, cfg)).nb_index
    else:
        # the sample is rows 0..m-1, which is what graph_from_candidates assumes of a candidate block
        candidates = torch.from_numpy(vectors.ann_candidates(uri, ids, x[rows], cfg))
        nb_index = graph_from_candidates(torch.from_numpy(x), torch.from_numpy(counts).float(), candidates, cfg.k,
                                         cfg.density_bandwidth)[0].numpy()
    search_seconds = (time.perf_counter() - start) * n / len(rows)
    out = {"seconds": index_seconds + search_seconds, "index_seconds": index_seconds, "search_seconds": search_seconds,
           "index": cfg.ann_index, "candidates": cfg.ann_candidates}
    if len(rows) < n:
        out |= {"extrapolated": True, "sampled_rows": len(rows)}
    return out, nb_index


def run(sizes: list[int], k: int) -> dict:
    results = []
    for n in sizes:
        x, counts = clustered(n)
        cfg = IndexConfig(k=k, ann_threshold=n - 1)
        exact, exact_ids, rows = _exact(x, counts, k, cfg.density_bandwidth, full=n <= GOAL["n"])
        results.append({"n": n, "k": k, "mode": "exact", **exact, "recall_at_k": 1.0})
        with tempfile.TemporaryDirectory() as tmp:
            ann, ann_ids = _ann(x, counts, cfg, tmp, rows)
        hits = [len(set(a) & set(e)) for a, e in zip(ann_ids, exact_ids)]
        results.append({"n": n, "k": k, "mode": "ann", **ann, "recall_at_k": float(np.sum(hits) / (len(rows) * k))})
    goal_rows = {r["mode"]: r for r in results if r["n"] == GOAL["n"]}
    met = None
    if goal_rows:
        met = (goal_rows["exact"]["seconds"] <= GOAL["max_seconds"]
               and goal_rows["ann"]["recall_at_k"] >= GOAL["min_recall_at_k"])
    return {"bench": "knn_graph", "dim": DIM, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "results": [{key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()} for r in results],
            "goal": GOAL, "goal_met": met}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="n = 1e4 and 1e5 only (the goal's size), not 1e6")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="+", help="override the sizes (default 1e4 1e5 1e6)")
    args = p.parse_args()
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    print(json.dumps(run(sizes, args.k)))


if __name__ == "__main__":
    main()
