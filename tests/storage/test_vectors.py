"""LanceDB tables: upserts of changed rows only, so unchanged re-runs create no new version."""

import subprocess
import sys
import time
from dataclasses import replace

import lancedb
import numpy as np
import pytest

from pogdiff.config import IndexConfig
from pogdiff.embedders import make_embedder
from pogdiff.graph_update import update_graph
from pogdiff.index import CaptionGraph, build_caption_graph, caption_id, needs_ann, neighbours_of, with_graph
from storage import vectors

KEY = make_embedder(IndexConfig()).key


def test_caption_graph_roundtrip_and_idempotent_writes(tmp_path):
    uri = str(tmp_path / "lancedb")
    counts = {"a red circle": 10, "a red square": 2, "a blue circle": 1, "a green cross": 4}
    cfg = IndexConfig(k=2)
    g1 = build_caption_graph(counts, vectors.known_vectors(uri, KEY), cfg)
    assert g1.embedded == 4
    r1 = vectors.write_caption_graph(uri, g1, cfg)
    assert r1.written == 4

    # same data again: nothing embedded, nothing written, same table version
    g2 = build_caption_graph(counts, vectors.known_vectors(uri, KEY), cfg)
    assert g2.embedded == 0
    r2 = vectors.write_caption_graph(uri, g2, cfg)
    assert (r2.written, r2.version) == (0, r1.version)

    # one new caption: only it is embedded; rows whose neighbours or density changed are rewritten
    counts["a red triangle"] = 1
    g3 = build_caption_graph(counts, vectors.known_vectors(uri, KEY), cfg)
    assert g3.embedded == 1
    r3 = vectors.write_caption_graph(uri, g3, cfg)
    assert 1 <= r3.written <= 5 and r3.version > r2.version
    table = vectors.read_caption_table(uri)
    assert table.num_rows == 5
    rows = {r["caption"]: r for r in table.to_pylist()}
    assert rows["a red triangle"]["count"] == 1
    assert all(len(r["neighbour_ids"]) == 2 for r in rows.values())
    red_circle_nb = {table.column("caption")[table.column("caption_id").to_pylist().index(i)].as_py()
                     for i in rows["a red circle"]["neighbour_ids"]}
    assert red_circle_nb & {"a red square", "a blue circle", "a red triangle"}
    stored = vectors.known_vectors(uri, KEY)[caption_id("a red circle")]
    np.testing.assert_allclose(np.linalg.norm(stored), 1.0, rtol=1e-5)


def test_schema_change_is_refused_with_advice(tmp_path):
    uri = str(tmp_path / "lancedb")
    counts = {"a red circle": 3, "a red square": 2, "a blue circle": 1}
    vectors.write_caption_graph(uri, build_caption_graph(counts, {}, IndexConfig(k=2)), IndexConfig(k=2))
    g = build_caption_graph(counts, vectors.known_vectors(uri, KEY), IndexConfig(k=1))
    with pytest.raises(ValueError, match="new lancedb_uri"):
        vectors.write_caption_graph(uri, g, IndexConfig(k=1))


def test_image_features_written_once(tmp_path):
    uri = str(tmp_path / "lancedb")
    f = np.eye(3, dtype=np.float32)
    vectors.write_image_features(uri, ["a", "b", "c"], "pixels16", f)
    assert vectors.known_feature_ids(uri, "pixels16") == {"a", "b", "c"}
    assert vectors.known_feature_ids(uri, "other") == set()
    v = lancedb.connect(uri).open_table(vectors.IMAGE_FEATURES).version
    assert vectors.write_image_features(uri, [], "pixels16", f[:0]).version == v
    np.testing.assert_array_equal(vectors.read_image_features(uri, "pixels16")["b"], f[1])


def test_image_features_of_another_extractor_replace_the_cache_whatever_their_width(tmp_path):
    uri = str(tmp_path / "lancedb")
    vectors.write_image_features(uri, ["a", "b"], "pixels16", np.eye(2, 3, dtype=np.float32))
    before = lancedb.connect(uri).open_table(vectors.IMAGE_FEATURES).version
    wide = np.ones((2, 5), np.float32)
    report = vectors.write_image_features(uri, ["a", "b"], "unet:abc", wide)  # index.image_feature changed
    assert report.version > before
    assert vectors.known_feature_ids(uri, "unet:abc") == {"a", "b"} and vectors.known_feature_ids(uri, "pixels16") == set()
    np.testing.assert_array_equal(vectors.read_image_features(uri, "unet:abc")["a"], wide[0])
    vectors.write_image_features(uri, ["c"], "unet:abc", wide[:1])  # same width again: an upsert
    assert vectors.known_feature_ids(uri, "unet:abc") == {"a", "b", "c"}


def _clustered_graph(n, d=384, seed=0):
    """n clustered unit vectors (20 per cluster on average) as a CaptionGraph without neighbours."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 20, 1), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"c{i:06d}" for i in range(n)]
    return CaptionGraph(ids=ids, captions=[f"caption {i}" for i in ids], vectors=x, counts=rng.integers(1, 30, n),
                        nb_index=np.zeros((n, 0), np.int64), nb_sims=np.zeros((n, 0), np.float32),
                        density=np.ones(n), embedded=n, embedder="test-embedder", mode="none")


@pytest.mark.parametrize("engine", ["ivf_flat", "hnsw"])
def test_ann_graph_recall_against_exact_and_idempotent_rerun(tmp_path, engine):
    uri = str(tmp_path / "lancedb")
    cfg = IndexConfig(k=10, ann_threshold=1000, knn_engine=engine)
    base = _clustered_graph(3000)
    assert needs_ann(3000, cfg) and not needs_ann(1000, cfg)
    ann = neighbours_of(base, cfg)
    exact = with_graph(base, cfg)
    assert ann.mode == "ann" and exact.mode == "exact"
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann.nb_index, exact.nb_index)])
    assert recall >= 0.95
    # density from the candidates equals the exact kernel sum wherever the kernel's reach fits in them
    np.testing.assert_allclose(np.median(ann.density / exact.density), 1.0, rtol=1e-4)
    assert np.all(ann.density <= exact.density * (1 + 1e-5))
    report = vectors.write_caption_graph(uri, ann, cfg)
    assert report.written == 3000 and report.ann_index  # above the threshold the table is indexed for queries

    # the same data again: the same graph (seeded), so nothing written and the same table version
    again = neighbours_of(base, cfg)
    np.testing.assert_array_equal(again.nb_index, ann.nb_index)
    rerun = vectors.write_caption_graph(uri, again, cfg)
    assert (rerun.written, rerun.version, rerun.rows) == (0, report.version, 3000)


def test_upserting_the_same_captions_twice_changes_nothing(tmp_path):
    uri = str(tmp_path / "lancedb")
    cfg = IndexConfig(k=3)
    g = with_graph(_clustered_graph(200, d=16), cfg)
    r1 = vectors.write_caption_graph(uri, g, cfg)
    before = vectors.read_caption_table(uri)
    r2 = vectors.write_caption_graph(uri, g, cfg)
    assert (r2.written, r2.version) == (0, r1.version)
    # force the same rows through merge_insert as well: matched on caption_id, so no new rows
    db = vectors.connect(uri)
    vectors._upsert(db, vectors.CAPTIONS, "caption_id", before, cfg.version_retention_days)
    after = vectors.read_caption_table(uri).sort_by("caption_id")
    assert after.num_rows == before.num_rows == 200
    assert after.equals(before.sort_by("caption_id"))
    assert not r2.ann_index  # 200 rows: below the threshold, LanceDB searches exactly


def test_vectors_are_reused_only_under_the_same_embedder(tmp_path):
    uri = str(tmp_path / "lancedb")
    cfg = IndexConfig(k=2)
    vectors.write_caption_graph(uri, with_graph(_clustered_graph(10, d=8), cfg), cfg)
    assert len(vectors.known_vectors(uri, "test-embedder")) == 10
    assert vectors.known_vectors(uri, "another-embedder") == {}


def test_search_captions_is_exact_below_the_threshold(tmp_path):
    uri = str(tmp_path / "lancedb")
    cfg = IndexConfig(k=3)
    g = with_graph(_clustered_graph(300, d=16), cfg)
    vectors.write_caption_graph(uri, g, cfg)
    hits = vectors.search_captions(uri, g.vectors[42], 4, cfg)
    assert [h["caption_id"] for h in hits] == [g.ids[42]] + [g.ids[j] for j in g.nb_index[42]]
    np.testing.assert_allclose([h["similarity"] for h in hits[1:]], g.nb_sims[42], rtol=1e-5)
    assert hits[0]["count"] == g.counts[42] and hits[0]["caption"] == g.captions[42]


def test_touching_lancedb_makes_child_processes_spawn(tmp_path):
    # a fresh interpreter: the start method is process-wide, and any earlier test may have set it
    code = ("import multiprocessing, sys; from storage import vectors; before = multiprocessing.get_start_method(allow_none=True); "
            "vectors.connect(sys.argv[1]); print(before, multiprocessing.get_start_method(allow_none=True))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lancedb")], capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert before == "None" and after in ("spawn", "forkserver")


def test_pruning_keeps_the_tagged_champion_versions_and_moves_on_when_the_tag_moves(tmp_path):
    uri = str(tmp_path / "lancedb")
    keep = 1e-5  # days: 0.86 s, so versions a second old are past the retention window
    feats = np.eye(4, 3, dtype=np.float32)

    def write(i: int) -> int:
        time.sleep(1.1)
        return vectors.write_image_features(uri, [f"img{i}"], "pixels16", feats[i : i + 1], keep).version

    first = vectors.write_image_features(uri, ["img0"], "pixels16", feats[:1], keep).version
    champion = write(1)
    with pytest.raises(FileNotFoundError, match=f"no version {first}"):  # untagged and old: pruned
        vectors.read_image_features(uri, "pixels16", first)
    vectors.tag_versions(uri, {vectors.IMAGE_FEATURES: champion}, "champion-demo")
    later = write(2)  # Lance alone would refuse to prune here (a tagged version in the pruned range)
    assert set(vectors.read_image_features(uri, "pixels16", champion)) == {"img0", "img1"}
    vectors.tag_versions(uri, {vectors.IMAGE_FEATURES: later}, "champion-demo")  # a new champion
    write(3)
    with pytest.raises(FileNotFoundError, match=f"no version {champion}"):
        vectors.read_image_features(uri, "pixels16", champion)
    assert set(vectors.read_image_features(uri, "pixels16", later)) == {"img0", "img1", "img2"}


def test_stored_graph_seeds_an_incremental_update_and_removed_captions_leave_the_table(tmp_path):
    uri = str(tmp_path / "lancedb")
    cfg = IndexConfig(k=4)
    every = _clustered_graph(700, d=16)
    first = with_graph(replace(every, ids=every.ids[:600], captions=every.captions[:600], vectors=every.vectors[:600],
                               counts=every.counts[:600], density=every.density[:600]), cfg)
    vectors.write_caption_graph(uri, first, cfg)
    # the next snapshot: 50 captions gone, 100 new
    final = replace(every, ids=every.ids[50:], captions=every.captions[50:], vectors=every.vectors[50:],
                    counts=every.counts[50:], density=every.density[50:])
    previous = vectors.read_caption_graph(uri, "test-embedder", cfg)
    assert previous is not None and sorted(previous.ids) == first.ids
    updated, recomputed = update_graph(final, previous, cfg)
    assert 100 <= recomputed < 650
    report = vectors.write_caption_graph(uri, updated, cfg)
    assert report.deleted == 50
    stored = vectors.read_caption_table(uri).sort_by("caption_id")
    full = with_graph(final, cfg)
    assert stored.column("caption_id").to_pylist() == full.ids
    assert stored.column("neighbour_ids").to_pylist() == [[full.ids[j] if j >= 0 else "" for j in row] for row in full.nb_index]
    np.testing.assert_allclose(stored.column("density").to_numpy(), full.density, rtol=1e-5)
    # only a graph made the same way seeds an update: another bandwidth or another embedder do not; an ANN
    # graph is read as one (it seeds the ANN update, pogdiff/ann_graph.py), under its own candidates only
    assert vectors.read_caption_graph(uri, "test-embedder", IndexConfig(k=4, density_bandwidth=0.1)) is None
    assert vectors.read_caption_graph(uri, "another-embedder", cfg) is None
    vectors.write_caption_graph(uri, replace(full, mode="ann"), cfg)
    ann = vectors.read_caption_graph(uri, "test-embedder", cfg)
    assert ann.mode == "ann" and sorted(ann.ids) == full.ids
    names = {caption: [ann.ids[j] for j in row] for caption, row in zip(ann.ids, ann.nb_index)}
    assert [names[caption] for caption in full.ids] == [[full.ids[j] for j in row] for row in full.nb_index]
    assert vectors.read_caption_graph(uri, "test-embedder", IndexConfig(k=4, ann_candidates=20)) is None
    with pytest.raises(ValueError, match="needs a stored exact graph"):
        update_graph(final, ann, cfg)
