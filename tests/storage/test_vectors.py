"""LanceDB tables: upserts of changed rows only, so unchanged re-runs create no new version."""

import lancedb
import numpy as np
import pytest

from pogdiff.config import IndexConfig
from pogdiff.index import build_caption_graph, caption_id
from storage import vectors


def test_caption_graph_roundtrip_and_idempotent_writes(tmp_path):
    uri = str(tmp_path / "lancedb")
    counts = {"a red circle": 10, "a red square": 2, "a blue circle": 1, "a green cross": 4}
    cfg = IndexConfig(k=2)
    g1 = build_caption_graph(counts, vectors.known_vectors(uri), cfg)
    assert g1.embedded == 4
    r1 = vectors.write_caption_graph(uri, g1)
    assert r1.written == 4

    # same data again: nothing embedded, nothing written, same table version
    g2 = build_caption_graph(counts, vectors.known_vectors(uri), cfg)
    assert g2.embedded == 0
    r2 = vectors.write_caption_graph(uri, g2)
    assert (r2.written, r2.version) == (0, r1.version)

    # one new caption: only it is embedded; rows whose neighbours or density changed are rewritten
    counts["a red triangle"] = 1
    g3 = build_caption_graph(counts, vectors.known_vectors(uri), cfg)
    assert g3.embedded == 1
    r3 = vectors.write_caption_graph(uri, g3)
    assert 1 <= r3.written <= 5 and r3.version > r2.version
    table = vectors.read_caption_table(uri)
    assert table.num_rows == 5
    rows = {r["caption"]: r for r in table.to_pylist()}
    assert rows["a red triangle"]["count"] == 1
    assert all(len(r["neighbour_ids"]) == 2 for r in rows.values())
    red_circle_nb = {table.column("caption")[table.column("caption_id").to_pylist().index(i)].as_py()
                     for i in rows["a red circle"]["neighbour_ids"]}
    assert red_circle_nb & {"a red square", "a blue circle", "a red triangle"}
    stored = vectors.known_vectors(uri)[caption_id("a red circle")]
    np.testing.assert_allclose(np.linalg.norm(stored), 1.0, rtol=1e-5)


def test_schema_change_is_refused_with_advice(tmp_path):
    uri = str(tmp_path / "lancedb")
    counts = {"a red circle": 3, "a red square": 2, "a blue circle": 1}
    vectors.write_caption_graph(uri, build_caption_graph(counts, {}, IndexConfig(k=2)))
    g = build_caption_graph(counts, vectors.known_vectors(uri), IndexConfig(k=1))
    with pytest.raises(ValueError, match="new lancedb_uri"):
        vectors.write_caption_graph(uri, g)


def test_image_features_written_once(tmp_path):
    uri = str(tmp_path / "lancedb")
    f = np.eye(3, dtype=np.float32)
    vectors.write_image_features(uri, ["a", "b", "c"], "pixels16", f)
    assert vectors.known_feature_ids(uri, "pixels16") == {"a", "b", "c"}
    assert vectors.known_feature_ids(uri, "other") == set()
    v = lancedb.connect(uri).open_table(vectors.IMAGE_FEATURES).version
    assert vectors.write_image_features(uri, [], "pixels16", f[:0]).version == v
    np.testing.assert_array_equal(vectors.read_image_features(uri, "pixels16")["b"], f[1])
