"""The incremental caption graph equals a full rebuild on the same final caption set."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pogdiff.config import IndexConfig
from pogdiff.graph_update import update_graph
from pogdiff.index import CaptionGraph, with_graph


def _captions(n: int, seed: int, d: int = 64) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n clustered unit vectors (clusters of ~8, so the kernel's reach and the top-k overlap), ids, counts."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 8, 1), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.15 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"s{seed}-{i:05d}" for i in range(n)], x, rng.integers(1, 30, n)


def _graph(ids: list[str], x: np.ndarray, counts: np.ndarray) -> CaptionGraph:
    order = np.argsort(ids)
    ids = [ids[i] for i in order]
    return CaptionGraph(ids=ids, captions=ids, vectors=x[order], counts=counts[order], nb_index=np.zeros((len(ids), 0), np.int64),
                        nb_sims=np.zeros((len(ids), 0), np.float32), density=counts[order].astype(np.float64), embedded=len(ids),
                        embedder="test", mode="none")


@pytest.mark.parametrize("k", [1, 5])
def test_an_update_with_additions_removals_and_new_counts_equals_a_full_rebuild(k):
    cfg = IndexConfig(k=k)
    ids, x, counts = _captions(3000, seed=0)
    before = with_graph(_graph(ids, x, counts), cfg)
    # shuffle the stored order: the update must not rely on it
    perm = np.random.default_rng(1).permutation(len(before.ids))
    inv = np.argsort(perm)
    stored = replace(before, ids=[before.ids[i] for i in perm], vectors=before.vectors[perm], counts=before.counts[perm],
                     nb_index=np.where(before.nb_index[perm] >= 0, inv[before.nb_index[perm]], -1), nb_sims=before.nb_sims[perm],
                     density=before.density[perm])

    rng = np.random.default_rng(2)
    keep = rng.random(len(ids)) > 0.02  # 2 % removed
    new_ids, new_x, new_counts = _captions(60, seed=3)  # 2 % added, some inside existing clusters:
    new_x[:30] = x[:30] + 0.05 * rng.standard_normal((30, x.shape[1])).astype(np.float32)
    new_x /= np.linalg.norm(new_x, axis=1, keepdims=True)
    counts = counts.copy()
    counts[rng.choice(len(ids), 40, replace=False)] += 5  # recounted captions
    final = _graph([i for i, m in zip(ids, keep) if m] + new_ids, np.concatenate([x[keep], new_x]),
                   np.concatenate([counts[keep], new_counts]))

    updated, recomputed = update_graph(final, stored, cfg)
    full = with_graph(final, cfg)
    np.testing.assert_array_equal(updated.nb_index, full.nb_index)
    np.testing.assert_allclose(updated.nb_sims, full.nb_sims, rtol=0, atol=1e-5)
    np.testing.assert_allclose(updated.density, full.density, rtol=1e-5)
    assert updated.mode == "exact"
    # it did recompute less than everything, but more than the new rows alone
    assert len(new_ids) < recomputed < len(final.ids) // 2


def test_an_unchanged_set_recomputes_nothing_and_a_wrong_k_is_refused():
    cfg = IndexConfig(k=3)
    ids, x, counts = _captions(500, seed=4)
    g = _graph(ids, x, counts)
    stored = with_graph(g, cfg)
    updated, recomputed = update_graph(g, stored, cfg)
    assert recomputed == 0
    np.testing.assert_array_equal(updated.nb_index, stored.nb_index)
    with pytest.raises(ValueError, match="k=3, the config k=4"):
        update_graph(g, stored, IndexConfig(k=4))
