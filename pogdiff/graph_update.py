"""Incremental caption graph: when captions arrive, leave or change their counts, recompute only the
rows whose top-k or density can change, so a nightly index over a large, slowly changing caption set
costs what changed, not C^2.

A row i of the exact graph depends on the other captions only through
- its top-k: it changes when an added caption j has cos(i, j) >= s_ik (i's k-th similarity; -inf
  when i has fewer than k neighbours), or when one of its k neighbours is removed;
- rho_eff(i) = sum_j n_j K(1 - cos(i, j)): it changes when a caption within the kernel's reach
  (cos >= 1 - KERNEL_CUTOFF h) is added, removed or recounted, i itself included.
Every other row keeps its stored neighbours and density, which are then exactly what a full rebuild
computes. The changed captions Δ are compared with all C rows (``|Δ| C D`` work, blockwise); the
affected rows are recomputed with ``exact_graph`` restricted to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from pogdiff.config import IndexConfig
from pogdiff.index import CaptionGraph
from pogdiff.neighbours import DUPLICATE_COS, KERNEL_CUTOFF, exact_graph

BLOCK = 1024  # changed captions compared with all rows per matmul: memory BLOCK * C floats


def _any_at_least(queries: np.ndarray, vectors: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``[C]`` bool: rows of ``vectors`` ``[C, D]`` whose cosine with some query ``[Q, D]`` is >= ``threshold``
    (a scalar or a per-row ``[C]`` tensor)."""
    hit = torch.zeros(vectors.shape[0], dtype=torch.bool)
    for start in range(0, len(queries), BLOCK):
        s = torch.from_numpy(np.ascontiguousarray(queries[start : start + BLOCK], np.float32)) @ vectors.T
        hit |= (s >= threshold).any(0)
    return hit


@dataclass(frozen=True)
class CarriedGraph:
    """The stored graph moved onto the new caption set (``carry_over``): rows ``[C]`` of the new set.

    kept / recounted ``[C]`` bool (in the stored set; with another count); prev_row ``[C]`` the stored
    row of each caption (-1 for new ones); removed ``[P]`` bool over the stored rows; lost ``[C]``
    bool: a kept row one of whose top-k was removed; nb / sims ``[C, k]`` and density ``[C]``, the
    stored values for kept rows (neighbour indices moved to the new positions, -1 for removed ones),
    -1 / -inf / 0 for new rows."""

    kept: np.ndarray
    recounted: np.ndarray
    prev_row: np.ndarray
    removed: np.ndarray
    lost: np.ndarray
    nb: np.ndarray
    sims: np.ndarray
    density: np.ndarray


def carry_over(graph: CaptionGraph, previous: CaptionGraph, k: int) -> CarriedGraph:
    """``previous``'s rows, neighbours and densities carried onto ``graph``'s captions (by caption id)."""
    if previous.nb_index.shape[1] != k:
        raise ValueError(f"the stored graph has k={previous.nb_index.shape[1]}, the config k={k}: rebuild it")
    c = len(graph.ids)
    final_pos = {caption: i for i, caption in enumerate(graph.ids)}
    prev_pos = {caption: i for i, caption in enumerate(previous.ids)}
    prev_of = np.array([prev_pos.get(caption, -1) for caption in graph.ids], np.int64)  # [C] row in previous
    kept = prev_of >= 0
    src = prev_of[kept]
    removed = np.array([caption not in final_pos for caption in previous.ids], bool)
    recounted = np.zeros(c, bool)
    recounted[kept] = previous.counts[src] != graph.counts[kept]

    to_final = np.array([final_pos.get(caption, -1) for caption in previous.ids] + [-1], np.int64)
    nb = np.full((c, k), -1, np.int64)
    sims = np.full((c, k), -np.inf, np.float32)
    density = np.zeros(c, np.float64)
    nb[kept] = to_final[previous.nb_index[src]]  # -1 stays -1: index -1 reads the appended -1
    sims[kept] = previous.nb_sims[src]
    density[kept] = previous.density[src]
    lost = np.zeros(c, bool)
    lost[kept] = ((previous.nb_index[src] >= 0) & (nb[kept] < 0)).any(1)
    return CarriedGraph(kept, recounted, prev_of, removed, lost, nb, sims, density)


def update_graph(graph: CaptionGraph, previous: CaptionGraph, cfg: IndexConfig) -> tuple[CaptionGraph, int]:
    """The exact graph of ``graph``'s captions, from ``previous`` (the stored exact graph of the same
    embedder, k and bandwidth) and the rows that can differ from it.

    graph: the caption set now, without neighbours (``embed_caption_counts``); previous: a graph over
    the caption set before (any order; nb_index into its own ids). Returns the graph, equal to
    ``with_graph(graph, cfg)`` up to float rounding, and the number of rows recomputed.
    """
    if previous.mode != "exact":
        raise ValueError(f"an exact update needs a stored exact graph, not an {previous.mode!r} one")
    k = cfg.k
    carried = carry_over(graph, previous, k)
    nb, sims, density, kept = carried.nb, carried.sims, carried.density, carried.kept
    redo = torch.from_numpy(~kept | carried.lost)
    v = torch.from_numpy(np.ascontiguousarray(graph.vectors, np.float32))
    reach = min(DUPLICATE_COS, 1.0 - KERNEL_CUTOFF * cfg.density_bandwidth)
    changed = np.concatenate([graph.vectors[~kept | carried.recounted], previous.vectors[carried.removed]])
    redo |= _any_at_least(changed, v, reach)
    redo |= _any_at_least(graph.vectors[~kept], v, torch.from_numpy(sims[:, k - 1]))

    rows = torch.nonzero(redo).flatten()
    if len(rows):
        ids_r, sims_r, rho_r = exact_graph(v, torch.from_numpy(graph.counts).float(), k, cfg.density_bandwidth, rows=rows)
        r = rows.numpy()
        nb[r], sims[r], density[r] = ids_r.numpy(), sims_r.numpy(), rho_r.numpy()
    return replace(graph, nb_index=nb, nb_sims=sims, density=density, mode="exact"), len(rows)
