"""LanceDB tables: caption vectors with their neighbour graph, and per-image feature vectors.

Schemas are declared once here. Writes are upserts on the id (``merge_insert``) of only the rows
that changed, so a re-run over unchanged data writes nothing and creates no new table version.
"""

from __future__ import annotations

from dataclasses import dataclass

import lancedb
import numpy as np
import pyarrow as pa

CAPTIONS = "captions"
IMAGE_FEATURES = "image_features"


def captions_schema(dim: int, k: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("caption_id", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
            # A variable list: lance 13 panics writing fixed-size lists of strings. Always k long.
            pa.field("neighbour_ids", pa.list_(pa.string()), nullable=False),  # "" where fewer than k exist
            pa.field("neighbour_sims", pa.list_(pa.float32(), k), nullable=False),  # -inf where missing
            pa.field("density", pa.float64(), nullable=False),
        ]
    )


def image_features_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("extractor", pa.string(), nullable=False),
            pa.field("feature", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


def connect(uri: str) -> lancedb.DBConnection:
    return lancedb.connect(uri)


def _open(db, name: str):
    return db.open_table(name) if name in db.list_tables().tables else None


def _upsert(db, name: str, key: str, rows: pa.Table) -> int:
    """Insert or update ``rows`` keyed on ``key``; returns the table version after the write."""
    table = _open(db, name)
    if table is None:
        table = db.create_table(name, rows)
        table.create_scalar_index(key)
        return table.version
    if rows.num_rows:
        table.merge_insert(key).when_matched_update_all().when_not_matched_insert_all().execute(rows)
        table.optimize()
    return table.version


def read_caption_table(uri: str) -> pa.Table | None:
    table = _open(connect(uri), CAPTIONS)
    return None if table is None else table.to_arrow()


def known_vectors(uri: str) -> dict[str, np.ndarray]:
    """caption id -> stored vector, for incremental embedding."""
    t = read_caption_table(uri)
    if t is None:
        return {}
    vec = np.asarray(t.column("vector").combine_chunks().flatten()).reshape(t.num_rows, -1)
    return dict(zip(t.column("caption_id").to_pylist(), vec))


@dataclass(frozen=True)
class WriteReport:
    rows: int
    written: int
    version: int


def write_caption_graph(uri: str, graph) -> WriteReport:
    """Upsert the rows of a ``pogdiff.index.CaptionGraph`` whose content changed."""
    c, k = graph.nb_index.shape
    nb_ids = [[graph.ids[j] if j >= 0 else "" for j in row] for row in graph.nb_index]
    new = pa.table(
        {
            "caption_id": graph.ids,
            "caption": graph.captions,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(graph.vectors.reshape(-1), pa.float32()), graph.vectors.shape[1]),
            "count": pa.array(graph.counts, pa.int64()),
            "neighbour_ids": pa.array(nb_ids, pa.list_(pa.string())),
            "neighbour_sims": pa.FixedSizeListArray.from_arrays(pa.array(graph.nb_sims.reshape(-1), pa.float32()), k),
            "density": pa.array(graph.density, pa.float64()),
        },
        schema=captions_schema(graph.vectors.shape[1], k),
    )
    db = connect(uri)
    old = read_caption_table(uri)
    if old is not None and old.schema != new.schema:
        raise ValueError(
            f"LanceDB table {CAPTIONS!r} at {uri} has schema {old.schema} but the index config needs {new.schema}; "
            "use a new lancedb_uri or drop the table to change the embedder or k"
        )
    changed = new
    if old is not None:
        before = {r["caption_id"]: r for r in old.to_pylist()}
        keep = [i for i, r in enumerate(new.to_pylist()) if before.get(r["caption_id"]) != r]
        changed = new.take(pa.array(keep, pa.int64()))
    version = _upsert(db, CAPTIONS, "caption_id", changed)
    return WriteReport(rows=new.num_rows, written=changed.num_rows, version=version)


def known_feature_ids(uri: str, extractor: str) -> set[str]:
    table = _open(connect(uri), IMAGE_FEATURES)
    if table is None:
        return set()
    t = table.to_arrow().select(["image_id", "extractor"])
    return {i for i, e in zip(t.column("image_id").to_pylist(), t.column("extractor").to_pylist()) if e == extractor}


def write_image_features(uri: str, image_ids: list[str], extractor: str, features: np.ndarray) -> WriteReport:
    """Insert features ``[N, F]`` of images not yet featurised (callers pass only new ids)."""
    db = connect(uri)
    if not image_ids:
        table = _open(db, IMAGE_FEATURES)
        return WriteReport(rows=0, written=0, version=table.version if table is not None else 0)
    rows = pa.table(
        {
            "image_id": image_ids,
            "extractor": [extractor] * len(image_ids),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), features.shape[1]),
        },
        schema=image_features_schema(features.shape[1]),
    )
    version = _upsert(db, IMAGE_FEATURES, "image_id", rows)
    return WriteReport(rows=len(image_ids), written=len(image_ids), version=version)


def read_image_features(uri: str, extractor: str) -> dict[str, np.ndarray]:
    table = _open(connect(uri), IMAGE_FEATURES)
    if table is None:
        return {}
    t = table.to_arrow()
    feats = np.asarray(t.column("feature").combine_chunks().flatten()).reshape(t.num_rows, -1)
    return {i: f for i, e, f in zip(t.column("image_id").to_pylist(), t.column("extractor").to_pylist(), feats) if e == extractor}


def table_versions(uri: str) -> dict[str, int]:
    db = connect(uri)
    return {name: db.open_table(name).version for name in db.list_tables().tables}
