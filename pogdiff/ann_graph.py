"""The ANN caption graph with its faiss index kept: a full build, and an incremental update that
costs what changed rather than a new index and a search of every caption.

A full build (``build``) trains the IVF-Flat index, searches every caption's ``ann_candidates`` + 1
nearest rows and refines the top-k and rho_eff from them (``neighbours.graph_from_candidates``):
rho_eff(i) = n_i + sum over i's candidates j within the kernel's reach of n_j K(1 - cos_ij). The index
comes back with the caption id of each of its vector ids (``AnnIndex``), so the index stage can store
it next to the vectors (``storage/ann_index.py``) and the next run can update it (``update``):

- the index: removed captions' vectors leave it (``remove_ids``), new captions' vectors join it
  (an IVF add assigns each to its nearest existing list: nothing is retrained);
- new captions, and kept captions that lost one of their top-k, are searched in the updated index
  and refined exactly as a full build refines a row (``recomputed``);
- every other row keeps its stored top-k and density, patched from the searches of what changed
  (``patched``): a new caption j enters the top-k of each row i among j's candidates with
  cos(i, j) >= i's k-th similarity, and adds n_j K(1 - cos) to rho_eff(i) within the kernel's reach;
  a removed caption takes its old count's term away from the rows among its candidates; a
  recounted caption adds the change of its count's term to itself and to the rows among its candidates.

Exact, up to float rounding: the refinement of every searched row, and the patch arithmetic.
Approximate, beyond what a full ANN build already approximates:
(1) a patch uses "i is among j's candidates" where a full build uses "j is among i's candidates";
the two agree when the search finds every caption within the kernel's reach of both, so they can
differ in clusters larger than ``ann_candidates`` (a full build then undercounts rho_eff, and the
patches may count a little more or less than it);
(2) the IVF lists were trained on the caption set of the last full build and new vectors join the
nearest of them; ``update_blocker`` asks for a full build once the set has halved or doubled since,
so the lists stay within a factor sqrt(2) of the 4 sqrt(C) a full build would choose.
tests/pogdiff/test_ann_graph.py bounds both against a full ANN rebuild and the exact graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from pogdiff import knn
from pogdiff.config import IndexConfig
from pogdiff.graph_update import carry_over
from pogdiff.index import CaptionGraph, with_graph
from pogdiff.neighbours import DUPLICATE_COS, KERNEL_CUTOFF, graph_from_candidates, kernel


@dataclass(frozen=True)
class AnnIndex:
    """A faiss IVF-Flat index over caption vectors, as stored between runs.

    index: the faiss index, whose vector ids are positions in ``slots``; slots ``[S]``: the caption id
    of each vector id ("" where that caption was removed since); key: what the index was built for
    (``index_key``); trained_on: the number of captions its lists were trained for."""

    index: Any
    slots: list[str]
    key: str
    trained_on: int

    def live(self) -> list[str]:
        """The captions the index holds vectors of (removed slots left out), in vector id order."""
        return [caption for caption in self.slots if caption]

    def holds(self, ids: list[str]) -> bool:
        """Whether the index holds vectors of exactly the captions ``ids``, each once."""
        live = self.live()
        # sets, not sorting: twice as fast at 1e6 captions; equal lengths and a duplicate-free live set
        # make ``ids`` duplicate-free too
        return len(live) == len(ids) and len(unique := set(live)) == len(live) and unique == set(ids)


def index_key(embedder: str, cfg: IndexConfig) -> str:
    """What a stored index must have been built for to be updated: the embedding space and the IVF layout
    (nprobe is a search setting, set when the index is loaded)."""
    return f"ivf_flat lists={cfg.ivf_lists or 'auto'} train_per_list={knn.TRAIN_PER_LIST} embedder={embedder}"


def build(graph: CaptionGraph, cfg: IndexConfig) -> tuple[CaptionGraph, AnnIndex | None]:
    """The ANN graph of ``graph``'s captions from a new index, and that index to store (None for the
    ``hnsw`` engine: faiss cannot remove vectors from it, so it is rebuilt every run)."""
    index = knn.build_index(graph.vectors, cfg)
    hits, sims = knn.search(index, graph.vectors, cfg.ann_candidates + 1)
    full = with_graph(graph, cfg, hits, sims)
    if cfg.knn_engine != "ivf_flat":
        return full, None
    return full, AnnIndex(index, list(graph.ids), index_key(graph.embedder, cfg), len(graph.ids))


def update_blocker(graph: CaptionGraph, previous: CaptionGraph | None, ann: AnnIndex | None, cfg: IndexConfig) -> str | None:
    """Why ``update`` cannot take ``graph`` (the caption set now) from the stored graph ``previous`` and
    its index ``ann``, so a full build runs; None when it can."""
    if cfg.knn_engine != "ivf_flat":
        return f"the {cfg.knn_engine} engine cannot remove vectors: every run builds the index anew"
    if previous is None or previous.mode != "ann":
        return "no stored ANN graph of this embedder, k, bandwidth and candidates"
    if ann is None:
        return "no stored index"
    if ann.key != (key := index_key(graph.embedder, cfg)):
        return f"the stored index was built for {ann.key!r}, not {key!r}"
    if not ann.holds(previous.ids):
        return "the stored index and the stored graph hold different captions"
    c = len(graph.ids)
    if not ann.trained_on / 2 <= c <= 2 * ann.trained_on:
        return f"{c} captions against {ann.trained_on} when the IVF lists were trained: they are retrained"
    if len(ann.slots) + c - len(set(graph.ids) & set(ann.live())) > 2 * c:
        return "more than half of the index's vector ids would belong to removed captions"
    return None


def update(graph: CaptionGraph, previous: CaptionGraph, ann: AnnIndex, cfg: IndexConfig) -> tuple[CaptionGraph, AnnIndex, int, int]:
    """The ANN graph of ``graph``'s captions (no neighbours yet, ``embed_caption_counts``) from the stored
    ANN graph ``previous`` (any row order) and its index ``ann`` (``update_blocker`` must have said
    None). ``ann.index`` is updated in place. Returns the graph, the index to store, the rows searched
    and refined anew, and the rows patched (see the module docstring for what is exact)."""
    k, bandwidth = cfg.k, cfg.density_bandwidth
    carried = carry_over(graph, previous, k)
    nb, sims, density, kept = carried.nb, carried.sims, carried.density, carried.kept
    counts = graph.counts.astype(np.float64)

    slots = list(ann.slots)
    slot_of = {caption: s for s, caption in enumerate(slots) if caption}
    gone = np.array([slot_of[caption] for caption, r in zip(previous.ids, carried.removed) if r], np.int64)
    if len(gone):
        ann.index.remove_ids(gone)
        for s in gone:
            slots[s] = ""
    added = np.flatnonzero(~kept)
    if len(added):
        ann.index.add_with_ids(np.ascontiguousarray(graph.vectors[added], np.float32),
                               np.arange(len(slots), len(slots) + len(added), dtype=np.int64))
        slots += [graph.ids[i] for i in added]
    final_pos = {caption: i for i, caption in enumerate(graph.ids)}
    position = np.array([final_pos.get(caption, -1) for caption in slots] + [-1], np.int64)  # faiss' -1 reads the -1

    # one search: rows recomputed, then removed and recounted captions (whose candidates are patched)
    searched = np.flatnonzero(~kept | carried.lost)
    recounted = np.flatnonzero(carried.recounted)
    queries = np.concatenate([graph.vectors[searched], previous.vectors[carried.removed], graph.vectors[recounted]])
    source = np.concatenate([searched, np.full(int(carried.removed.sum()), -1), recounted])
    change = np.concatenate([np.where(kept[searched], 0.0, counts[searched]),  # a kept row searched again changed nothing
                             -previous.counts[carried.removed].astype(np.float64),
                             counts[recounted] - previous.counts[carried.prev_row[recounted]]])
    if not len(queries):
        return replace(graph, nb_index=nb, nb_sims=sims, density=density, mode="ann"), replace(ann, slots=slots), 0, 0
    hits, hit_sims = knn.search(ann.index, queries, cfg.ann_candidates + 1)
    hit_rows = position[hits]
    if len(searched):
        ids_r, sims_r, rho_r = graph_from_candidates(
            torch.from_numpy(graph.vectors), torch.from_numpy(counts).float(), torch.from_numpy(hit_rows[: len(searched)]), k,
            bandwidth, candidate_sims=torch.from_numpy(hit_sims[: len(searched)]), rows=torch.from_numpy(searched))
        nb[searched], sims[searched], density[searched] = ids_r.numpy(), sims_r.numpy(), rho_r.numpy()

    patchable = np.ones(len(graph.ids), bool)
    patchable[searched] = False
    row, s = hit_rows.ravel(), hit_sims.ravel().astype(np.float64)
    src = np.repeat(source, hits.shape[1])
    w = np.repeat(change, hits.shape[1])
    ok = (row >= 0) & patchable[row] & (row != src)
    near = ok & (w != 0) & (s > 1.0 - KERNEL_CUTOFF * bandwidth)  # the reach graph_from_candidates sums over
    np.add.at(density, row[near], w[near] * kernel(torch.from_numpy(1.0 - s[near]), bandwidth).numpy())
    own = recounted[patchable[recounted]]
    density[own] += counts[own] - previous.counts[carried.prev_row[own]]
    is_new = np.zeros(len(graph.ids) + 1, bool)  # + 1: src -1 (a removed caption) reads False
    is_new[added] = True
    enters = ok & is_new[src] & (s >= sims[row, k - 1]) & (s < DUPLICATE_COS)
    _merge(nb, sims, row[enters], src[enters], s[enters])
    # a removed caption's term may never have been counted (it was beyond i's candidates): rho_eff >= n_i still
    density[patchable] = np.maximum(density[patchable], counts[patchable])
    patched = len(np.union1d(np.unique(row[near | enters]), own))
    out = replace(graph, nb_index=nb, nb_sims=sims, density=density, mode="ann")
    return out, replace(ann, slots=slots), len(searched), patched


def _merge(nb: np.ndarray, sims: np.ndarray, rows: np.ndarray, ids: np.ndarray, new_sims: np.ndarray) -> None:
    """Merge the entries (rows[e], ids[e], new_sims[e]) into the top-k ``nb`` / ``sims`` ``[C, k]`` in place,
    keeping each row's k most similar, sorted by decreasing similarity."""
    if not len(rows):
        return
    k = nb.shape[1]
    touched = np.unique(rows)
    r = np.concatenate([np.repeat(touched, k), rows])
    i = np.concatenate([nb[touched].ravel(), ids])
    s = np.concatenate([sims[touched].ravel().astype(np.float64), new_sims])
    order = np.lexsort((-s, r))  # by row, then most similar first (-inf padding last)
    r, i, s = r[order], i[order], s[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r)
    top = rank < k
    nb[r[top], rank[top]] = i[top]
    sims[r[top], rank[top]] = s[top]
