"""The stored faiss index of the caption graph: a round trip through a folder and through a URI."""

import numpy as np
import pytest

from pogdiff import ann_graph, knn
from pogdiff.config import IndexConfig
from pogdiff.index import CaptionGraph
from storage import ann_index, vectors


def _built(n: int = 400):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"c{i:04d}" for i in range(n)]
    graph = CaptionGraph(ids=ids, captions=ids, vectors=x, counts=np.ones(n, np.int64), nb_index=np.zeros((n, 0), np.int64),
                         nb_sims=np.zeros((n, 0), np.float32), density=np.ones(n), embedded=n, embedder="test", mode="none")
    return ann_graph.build(graph, IndexConfig(k=3, ann_threshold=10))


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_the_index_round_trips_next_to_the_lancedb_tables(tmp_path, scheme):
    uri = scheme + str(tmp_path / "lancedb")
    graph, ann = _built()
    assert ann_index.read_ann_index(uri, IndexConfig()) is None  # nothing stored yet
    ann.index.remove_ids(np.array([5], np.int64))
    slots = ann.slots[:5] + [""] + ann.slots[6:]  # a removed caption keeps its vector id, with no caption
    first = ann_index.write_ann_index(uri, ann_graph.AnnIndex(ann.index, slots, ann.key, ann.trained_on))
    loaded, generation = ann_index.read_ann_index(uri, IndexConfig(ivf_nprobe=3))
    assert generation == first and loaded.slots == slots and (loaded.key, loaded.trained_on) == (ann.key, 400)
    assert loaded.index.ntotal == 399 and loaded.index.nprobe == 3  # nprobe comes from the config, not the file
    ann.index.nprobe = 3
    np.testing.assert_array_equal(knn.search(loaded.index, graph.vectors, 4)[0], knn.search(ann.index, graph.vectors, 4)[0])
    # a second write replaces it whole, under a new generation, and LanceDB does not take the folder for a table
    assert ann_index.write_ann_index(uri, ann) != first
    assert ann_index.read_ann_index(uri, IndexConfig())[0].slots == ann.slots
    assert vectors.table_versions(uri) == {}


def test_an_unreadable_index_is_named_with_what_to_do(tmp_path):
    uri = str(tmp_path / "lancedb")
    path = tmp_path / "lancedb" / ann_index.FOLDER / ann_index.FILE
    ann_index.write_ann_index(uri, _built()[1])
    whole = path.read_bytes()
    for broken in (b"not an index", whole[: len(whole) // 2]):  # another file; a copy cut short
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=f"stored caption index {path} cannot be read .*delete it"):
            ann_index.read_ann_index(uri, IndexConfig())
