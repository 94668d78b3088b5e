"""The caption neighbour graph at scale: the exact blockwise torch pass against the all-pairs ANN engine.

    python -m bench.knn_graph [--quick] [--k 10] [--sizes 10000 100000] [--engine ivf_flat|hnsw]

Data: clustered, L2-normalised 384-d vectors (the MiniLM dimension; about 20 captions per cluster,
as paraphrases and attribute variants of one subject form clusters in real caption sets), with
random training counts. For each n:

- ``exact``: ``pogdiff.neighbours.exact_graph`` (top-k and rho_eff in one pass), what the index stage
  runs up to ``ann_threshold``. Above 1e5 it is run on a sample of query rows only and its time is
  extrapolated (``extrapolated: true``, ``sampled_rows``); those rows are the recall reference.
- ``ann``: the index stage's path above the threshold (``pogdiff.knn``), over all n rows, measured, not
  extrapolated: the faiss index built (``index_seconds``), every caption's candidates searched
  (``search_seconds``) and its top-k and density refined from them (``refine_seconds``);
  ``recall_at_k`` against the exact top-k (all rows up to 1e5, the sampled rows above).
- ``ann_update``: 1 % new captions (same clusters) added to those n, as the next index run does it
  (``pogdiff.ann_graph.update``): the stored index read from disk (``load_seconds``, ``storage/ann_index.py``),
  checked against the stored graph (``update_blocker``) and updated with the new vectors, the new rows
  searched and refined and the old rows they reach patched (``update_seconds``), the index written back (``store_seconds``); ``seconds`` is all three,
  ``share_of_full_build`` that against the ``ann`` row's seconds (which store nothing).
  ``recall_at_k`` against the exact top-k over all n + 1 % captions, of sampled old and new rows.
  The LanceDB reads and writes around both paths are the same work and are not timed here.

Prints one JSON document with the figures and the goals they are compared with (issue 19, 2 cores,
k = 10): the ANN graph of 1e5 captions in at most 30 s and of 1e6 in at most 600 s, recall@10 at
least 0.95 at each; adding 1 % to 1e6 in at most 10 % of the full build's time.
``--quick``: n = 1e4 only, a smoke run (``"smoke": true``) with no verdict.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from pogdiff import ann_graph, knn
from pogdiff.config import IndexConfig
from pogdiff.index import CaptionGraph
from pogdiff.neighbours import exact_graph, graph_from_candidates
from storage import ann_index

GOALS = [{"n": 100_000, "k": 10, "max_seconds": 30.0, "min_recall_at_k": 0.95},
         {"n": 1_000_000, "k": 10, "max_seconds": 600.0, "min_recall_at_k": 0.95}]
UPDATE_GOALS = [{"n": 1_000_000, "k": 10, "added_share": 0.01, "max_share_of_full_build": 0.10}]
ADDED_SHARE = 0.01
FULL_EXACT_UP_TO = 100_000
DIM = 384
EXACT_SAMPLE = 4096  # query rows timed (exact and ANN) where searching all n rows is too long to run
SAMPLE_BLOCK = 256


def clustered(n: int, seed: int = 0, extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[n + extra, 384]`` unit vectors around n / 20 random centres, and counts ``[n + extra]`` in 1..30;
    the ``extra`` rows come last, around the same centres, and the first n do not depend on them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 20, 1), DIM)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    counts = rng.integers(1, 31, n)
    more = np.random.default_rng(seed + 1)
    y = centres[more.integers(0, len(centres), extra)] + 0.35 * more.standard_normal((extra, DIM)).astype(np.float32)
    x = np.concatenate([x, y])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.concatenate([counts, more.integers(1, 31, extra)])


def _exact_ids(v: torch.Tensor, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids ``[R, k]`` of ``rows`` against every row of ``v`` (itself excluded)."""
    ids = np.empty((len(rows), k), np.int64)
    for b in range(0, len(rows), SAMPLE_BLOCK):  # blocks keep the [b, n] similarity matrix at ~1 GB for n = 1e6
        r = torch.from_numpy(rows[b : b + SAMPLE_BLOCK])
        s = v[r] @ v.T
        s[torch.arange(len(r)), r] = float("-inf")
        ids[b : b + len(r)] = s.topk(k, dim=1).indices.numpy()
    return ids


def _recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) for a, e in zip(ids, exact)]) / exact.shape[1])


def _exact(x: np.ndarray, counts: np.ndarray, k: int, bandwidth: float, full: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """Exact top-k of every row (or of the first EXACT_SAMPLE rows, time extrapolated); ids and query rows."""
    v, n = torch.from_numpy(x), torch.from_numpy(counts)
    if full:
        start = time.perf_counter()
        ids, _, _ = exact_graph(v, n, k, bandwidth)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "extrapolated": False}, ids.numpy(), np.arange(len(x))
    rows = np.arange(min(EXACT_SAMPLE, len(x)))  # the rows are in random order: the first ones are a sample
    start = time.perf_counter()
    ids = _exact_ids(v, rows, k)
    seconds = (time.perf_counter() - start) * len(x) / len(rows)
    return {"seconds": seconds, "extrapolated": True, "sampled_rows": len(rows)}, ids, rows


def _graph(x: np.ndarray, counts: np.ndarray) -> CaptionGraph:
    """The captions as the index stage holds them before their graph (ids in row order)."""
    n = len(x)
    return CaptionGraph(ids=[f"{i:09d}" for i in range(n)], captions=[""] * n, vectors=x, counts=counts,
                        nb_index=np.zeros((n, 0), np.int64), nb_sims=np.zeros((n, 0), np.float32),
                        density=counts.astype(np.float64), embedded=n, embedder="bench", mode="none")


def _ann(x: np.ndarray, counts: np.ndarray, cfg: IndexConfig) -> tuple[dict, CaptionGraph, ann_graph.AnnIndex | None]:
    """The index stage's graph above the threshold, over all n rows: the faiss index built, every row's
    candidates searched, the top-k and density refined from them; returns the timings, the graph and
    the index as ``ann_graph.build`` returns them."""
    start = time.perf_counter()
    index = knn.build_index(x, cfg)
    index_seconds = time.perf_counter() - start
    start = time.perf_counter()
    candidates, sims = knn.search(index, x, cfg.ann_candidates + 1)
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    nb, nb_sims, density = graph_from_candidates(torch.from_numpy(x), torch.from_numpy(counts).float(), torch.from_numpy(candidates),
                                                 cfg.k, cfg.density_bandwidth, candidate_sims=torch.from_numpy(sims))
    refine_seconds = time.perf_counter() - start
    base = _graph(x, counts)
    graph = replace(base, nb_index=nb.numpy(), nb_sims=nb_sims.numpy(), density=density.numpy().astype(np.float64), mode="ann")
    ann = ann_graph.AnnIndex(index, list(base.ids), ann_graph.index_key(base.embedder, cfg), len(x)) if cfg.knn_engine == "ivf_flat" else None
    return {"seconds": index_seconds + search_seconds + refine_seconds, "index_seconds": index_seconds,
            "search_seconds": search_seconds, "refine_seconds": refine_seconds, "engine": cfg.knn_engine,
            "lists": knn.ivf_lists(len(x), cfg) if cfg.knn_engine == "ivf_flat" else None,
            "nprobe": cfg.ivf_nprobe if cfg.knn_engine == "ivf_flat" else None, "candidates": cfg.ann_candidates}, graph, ann


def _update(stored: CaptionGraph, ann: ann_graph.AnnIndex, x: np.ndarray, counts: np.ndarray, cfg: IndexConfig) -> dict:
    """``ann_update``: the stored graph and index of the first n rows updated to all rows of ``x``."""
    final = _graph(x, counts)
    with tempfile.TemporaryDirectory() as folder:
        ann_index.write_ann_index(folder, ann)
        start = time.perf_counter()
        loaded, _ = ann_index.read_ann_index(folder, cfg)
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        blocker = ann_graph.update_blocker(final, stored, loaded, cfg)  # the index stage asks first, too
        if blocker is not None:
            raise RuntimeError(f"the stored graph cannot be updated: {blocker}")
        updated, loaded, recomputed, patched = ann_graph.update(final, stored, loaded, cfg)
        update_seconds = time.perf_counter() - start
        start = time.perf_counter()
        ann_index.write_ann_index(folder, loaded)
        store_seconds = time.perf_counter() - start
    n = len(stored.ids)
    rows = np.concatenate([np.arange(min(EXACT_SAMPLE // 2, n)), np.arange(n, min(n + EXACT_SAMPLE // 2, len(x)))])
    recall = _recall(updated.nb_index[rows], _exact_ids(torch.from_numpy(x), rows, cfg.k))
    return {"added": len(x) - n, "seconds": load_seconds + update_seconds + store_seconds, "load_seconds": load_seconds,
            "update_seconds": update_seconds, "store_seconds": store_seconds, "recomputed": recomputed, "patched": patched,
            "recall_at_k": recall, "sampled_rows": len(rows)}


def run(sizes: list[int], k: int, engine: str, smoke: bool) -> dict:
    results = []
    for n in sizes:
        x, counts = clustered(n, extra=int(ADDED_SHARE * n))
        cfg = IndexConfig(k=k, ann_threshold=n - 1, knn_engine=engine)
        exact, exact_ids, rows = _exact(x[:n], counts[:n], k, cfg.density_bandwidth, full=n <= FULL_EXACT_UP_TO)
        results.append({"n": n, "k": k, "mode": "exact", **exact, "recall_at_k": 1.0})
        ann, graph, index = _ann(x[:n], counts[:n], cfg)
        results.append({"n": n, "k": k, "mode": "ann", **ann, "recall_at_k": _recall(graph.nb_index[rows], exact_ids)})
        if index is not None:  # an hnsw index is rebuilt every run, never updated
            update = _update(graph, index, x, counts, cfg)
            results.append({"n": n, "k": k, "mode": "ann_update", **update, "full_build_seconds": ann["seconds"],
                            "share_of_full_build": update["seconds"] / ann["seconds"]})
    doc = {"bench": "knn_graph", "dim": DIM, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "results": [{key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()} for r in results], "smoke": smoke}
    if smoke:
        return doc
    verdicts = []
    for goal in GOALS:
        row = next((r for r in results if r["mode"] == "ann" and r["n"] == goal["n"] and r["k"] == goal["k"]), None)
        if row is not None:
            met = row["seconds"] <= goal["max_seconds"] and row["recall_at_k"] >= goal["min_recall_at_k"]
            verdicts.append({**goal, "seconds": round(row["seconds"], 2), "recall_at_k": round(row["recall_at_k"], 4), "met": met})
    for goal in UPDATE_GOALS:
        row = next((r for r in results if r["mode"] == "ann_update" and r["n"] == goal["n"] and r["k"] == goal["k"]), None)
        if row is not None:
            verdicts.append({**goal, "seconds": round(row["seconds"], 2), "share_of_full_build": round(row["share_of_full_build"], 4),
                             "met": row["share_of_full_build"] <= goal["max_share_of_full_build"]})
    return {**doc, "goals": verdicts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: n = 1e4 only, no goal verdict")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="+", help="override the sizes (default 1e4 1e5 1e6)")
    p.add_argument("--engine", choices=["ivf_flat", "hnsw"], default=IndexConfig.model_fields["knn_engine"].default)
    args = p.parse_args()
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    print(json.dumps(run(sizes, args.k, args.engine, smoke=args.quick)))


if __name__ == "__main__":
    main()
