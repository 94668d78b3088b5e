"""The index stage's library half: incremental caption embedding and the graph over it."""

import numpy as np
import pytest

from pogdiff.config import IndexConfig
from pogdiff.embedders import make_embedder
from pogdiff.index import build_caption_graph, caption_id, embed_caption_counts, needs_ann, with_graph

COUNTS = {"a red circle": 40, "a red circle.": 1, "a small red circle": 2, "a green cross": 3, "a blue square": 1}


def test_rerun_on_unchanged_captions_embeds_nothing_and_gives_the_same_graph():
    cfg = IndexConfig(k=2)
    embedder = make_embedder(cfg)
    first = build_caption_graph(COUNTS, {}, cfg, embedder)
    assert (first.embedded, first.reused, first.mode, first.embedder) == (5, 0, "exact", embedder.key)
    known = dict(zip(first.ids, first.vectors))
    again = build_caption_graph(COUNTS, known, cfg, embedder)
    assert (again.embedded, again.reused) == (0, 5)
    np.testing.assert_array_equal(again.nb_index, first.nb_index)
    np.testing.assert_array_equal(again.density, first.density)


def test_graph_rows_are_sorted_ids_with_counts_and_neighbours():
    g = build_caption_graph(COUNTS, {}, IndexConfig(k=2))
    assert g.ids == sorted(caption_id(c) for c in COUNTS)
    assert [COUNTS[c] for c in g.captions] == g.counts.tolist()
    np.testing.assert_allclose(np.linalg.norm(g.vectors, axis=1), 1.0, rtol=1e-5)
    red = g.captions.index("a red circle")
    # its nearest captions are the other red circles, and the rare variants borrow its count
    assert {g.captions[j] for j in g.nb_index[red]} == {"a red circle.", "a small red circle"}
    rare = g.captions.index("a red circle.")
    assert g.density[rare] > 10 * g.density[g.captions.index("a blue square")]
    assert np.all(g.density >= g.counts)


def test_ann_mode_is_chosen_above_the_threshold_and_fed_candidates():
    cfg = IndexConfig(k=1, ann_threshold=3, ann_candidates=3)
    plain = embed_caption_counts(COUNTS, {}, cfg)
    assert plain.mode == "none" and plain.nb_index.shape == (5, 0)
    assert needs_ann(len(plain.ids), cfg)
    everyone = np.tile(np.arange(5), (5, 1))
    ann = with_graph(plain, cfg, everyone)
    exact = with_graph(plain, cfg)
    assert ann.mode == "ann"
    np.testing.assert_array_equal(ann.nb_index, exact.nb_index)
    np.testing.assert_allclose(ann.density, exact.density, rtol=1e-5)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="dataset is empty"):
        embed_caption_counts({}, {}, IndexConfig())
