"""LanceDB tables: caption vectors with their neighbour graph, and per-image feature vectors.

Schemas are declared once here. Writes are upserts on the id (``merge_insert``, with a scalar index
on it) of only the rows that changed, so a re-run over unchanged data writes nothing and creates no
new table version; ``optimize()`` follows every write (compaction, and new rows folded into the
indices). Above ``IndexConfig.ann_threshold`` rows the ``vector`` column gets a cosine ANN index, and
searches use it; below it LanceDB searches exactly (flat scan).

lance is not fork-safe: ``connect`` switches this process's multiprocessing start method to spawn,
so no child process is ever forked from a process that holds LanceDB state.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import HnswSq, IvfPq

from pogdiff.config import IndexConfig
from pogdiff.index import CaptionGraph
from storage.links import has_scheme

CAPTIONS = "captions"
GRAPH_KEY = "pogdiff:graph"  # density field metadata: how the stored graph was made (``_graph_key``)
DELETE_BATCH = 1000  # removed caption ids per delete filter
IMAGE_FEATURES = "image_features"
VECTOR = "vector"


def captions_schema(dim: int, k: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("caption_id", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("embedder", pa.string(), nullable=False),  # key of the embedding space of `vector`
            pa.field(VECTOR, pa.list_(pa.float32(), dim), nullable=False),
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


def _spawn_children() -> None:
    if multiprocessing.get_start_method(allow_none=True) not in ("spawn", "forkserver"):
        multiprocessing.set_start_method("spawn", force=True)


def connect(uri: str) -> lancedb.DBConnection:
    _spawn_children()
    try:
        return lancedb.connect(uri)  # creates a local folder when missing
    except OSError as err:
        raise PermissionError(f"LanceDB directory {uri} cannot be created: {err.strerror or err}") from None


def open_table(db, name: str, version: int | None = None):
    """The table (None when it does not exist), checked out read-only at ``version`` when given."""
    if name not in db.list_tables().tables:
        return None
    table = db.open_table(name)
    if version is not None:
        try:
            table.checkout(version)
        except Exception as err:  # lance raises a bare error naming neither table nor version
            raise FileNotFoundError(f"LanceDB table {name!r} has no version {version} (pruned, or a re-created table): {err}") from None
    return table


def check_writable(uri: str) -> None:
    """Raise ``PermissionError`` naming the path when a local LanceDB directory cannot be created or
    written (lance's own error names neither the table nor the folder). URIs (``s3://…``) pass."""
    if has_scheme(uri):
        return
    path = Path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"LanceDB directory {uri} cannot be created: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"LanceDB directory {uri} is not writable (permissions {path.stat().st_mode & 0o777:o})")


def quote_sql(value: str) -> str:
    """``value`` as a SQL string literal for a LanceDB filter (``'`` doubled). Every value put into a
    ``where`` expression goes through here, never pasted raw."""
    if not isinstance(value, str):
        raise TypeError(f"filter values must be str, got {type(value).__name__}")
    return "'" + value.replace("'", "''") + "'"


def _optimize(table, retention_days: float) -> None:
    """Compact, and prune versions older than ``retention_days``, but never a tagged version.

    Lance refuses to prune at all when a tagged version falls inside the pruned range, so the
    cutoff stops just before the oldest tagged version: everything from it on is kept.
    """
    keep = timedelta(days=retention_days)
    tagged = {v["version"] for v in table.tags.list().values()}
    if tagged:
        made = {v["version"]: v["timestamp"] for v in table.list_versions()}
        oldest = min((made[v] for v in tagged if v in made), default=None)
        if oldest is not None:
            now = datetime.now(oldest.tzinfo) if oldest.tzinfo else datetime.now()
            keep = max(keep, now - oldest + timedelta(seconds=1))
    table.optimize(cleanup_older_than=keep)


def _upsert(db, name: str, key: str, rows: pa.Table, retention_days: float):
    """Insert or update ``rows`` keyed on ``key``; returns the table (None if it does not exist and rows is empty)."""
    check_writable(db.uri)
    table = open_table(db, name)
    if table is None:
        if not rows.num_rows:
            return None
        table = db.create_table(name, rows)
        table.create_scalar_index(key)
        return table
    if rows.num_rows:
        table.merge_insert(key).when_matched_update_all().when_not_matched_insert_all().execute(rows)
        _optimize(table, retention_days)
    return table


def _vector_index(table) -> bool:
    return any(VECTOR in ix.columns for ix in table.list_indices())


def _ensure_ann_index(table, cfg: IndexConfig) -> None:
    """Create the cosine ANN index once the table outgrows exact search; later writes' optimize() extends it."""
    if table is None or table.count_rows() <= cfg.ann_threshold or _vector_index(table):
        return
    if cfg.ann_index == "IVF_PQ":
        dim = table.schema.field(VECTOR).type.list_size
        # dim / sub-vectors a multiple of 8 keeps PQ's distance tables aligned (LanceDB's advice)
        config = IvfPq(distance_type="cosine", num_sub_vectors=max(1, dim // 8))
    else:
        config = HnswSq(distance_type="cosine")
    table.create_index(VECTOR, config=config)


def read_caption_table(uri: str, version: int | None = None) -> pa.Table | None:
    """The captions table now, or at ``version`` (a pinned lineage version)."""
    table = open_table(connect(uri), CAPTIONS, version)
    return None if table is None else table.to_arrow()


def matrix(column: pa.ChunkedArray | pa.Array, rows: int) -> np.ndarray:
    """A fixed-size-list column as a float32 ``[rows, list_size]`` array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(rows, column.type.list_size)


def known_vectors(uri: str, embedder: str) -> dict[str, np.ndarray]:
    """caption id -> stored vector made by ``embedder`` (its key), for incremental embedding."""
    t = read_caption_table(uri)
    if t is None:
        return {}
    t = t.filter(pc.equal(t.column("embedder"), embedder))
    return dict(zip(t.column("caption_id").to_pylist(), matrix(t.column(VECTOR), t.num_rows)))


@dataclass(frozen=True)
class WriteReport:
    rows: int
    written: int
    version: int
    ann_index: bool = False  # whether the vector column now has an ANN index
    deleted: int = 0  # rows removed: captions the written graph no longer has


def _caption_rows(graph, k: int, nb_sims: np.ndarray, density: np.ndarray) -> pa.Table:
    dim = graph.vectors.shape[1]
    # neighbour indices to ids in one Arrow take (-1, no neighbour, reads the appended "")
    names = pa.array(list(graph.ids) + [""], pa.string()).take(pa.array(graph.nb_index.reshape(-1) % (len(graph.ids) + 1)))
    nb_ids = pa.ListArray.from_arrays(pa.array(np.arange(0, len(names) + 1, k, dtype=np.int32)), names)
    return pa.table(
        {
            "caption_id": graph.ids,
            "caption": graph.captions,
            "embedder": [graph.embedder] * len(graph.ids),
            VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(graph.vectors.reshape(-1), pa.float32()), dim),
            "count": pa.array(graph.counts, pa.int64()),
            "neighbour_ids": nb_ids,
            "neighbour_sims": pa.FixedSizeListArray.from_arrays(pa.array(nb_sims.reshape(-1), pa.float32()), k),
            "density": pa.array(density, pa.float64()),
        },
        schema=captions_schema(dim, k),
    )


def _check_schema(uri: str, old: pa.Table | None, new: pa.Schema) -> None:
    if old is not None and old.schema != new:
        raise ValueError(
            f"LanceDB table {CAPTIONS!r} at {uri} has schema {old.schema} but the index config needs {new}; "
            "use a new lancedb_uri or drop the table to change the embedder's dimension or k"
        )


def _changed(old: pa.Table | None, new: pa.Table, columns: list[str]) -> np.ndarray:
    """Positions of ``new`` rows that are absent from ``old`` or differ from it in any of ``columns``."""
    if old is None:
        return np.arange(new.num_rows)
    pos = pc.index_in(new.column("caption_id"), value_set=old.column("caption_id")).to_numpy(zero_copy_only=False)
    present = ~np.isnan(pos.astype(np.float64))
    src = np.where(present, pos, 0).astype(np.int64)
    same = present.copy()
    for name in columns:
        a, b = new.column(name).combine_chunks(), old.column(name).take(pa.array(src)).combine_chunks()
        if pa.types.is_fixed_size_list(a.type):
            x, y = matrix(a, new.num_rows), matrix(b, new.num_rows)
            same &= ((x == y) | (np.isnan(x) & np.isnan(y))).all(1)
        else:
            if pa.types.is_list(a.type):  # no list equality kernel in Arrow: compare the joined ids
                a, b = pc.binary_join(a, "\x1f"), pc.binary_join(b, "\x1f")
            same &= np.asarray(pc.fill_null(pc.equal(a, b), False))
    return np.flatnonzero(~same)


def _write(uri: str, new: pa.Table, old: pa.Table | None, columns: list[str], cfg: IndexConfig) -> WriteReport:
    changed = new.take(pa.array(_changed(old, new, columns), pa.int64()))
    table = _upsert(connect(uri), CAPTIONS, "caption_id", changed, cfg.version_retention_days)
    _ensure_ann_index(table, cfg)
    return WriteReport(rows=new.num_rows, written=changed.num_rows, version=table.version, ann_index=_vector_index(table))


def _graph_key(mode: str, cfg: IndexConfig) -> str:
    """How a stored graph was made; only a graph made the same way seeds an update (an ANN graph's
    density sums over its ``ann_candidates``, so they are part of how it was made)."""
    key = f"{mode} k={cfg.k} bandwidth={cfg.density_bandwidth!r}"
    return key + f" candidates={cfg.ann_candidates}" if mode == "ann" else key


def _stored_key(table) -> str | None:
    value = (table.schema.field("density").metadata or {}).get(GRAPH_KEY.encode())
    return None if value is None else value.decode()


def read_caption_graph(uri: str, embedder: str, cfg: IndexConfig) -> CaptionGraph | None:
    """The stored graph as a ``CaptionGraph`` (rows in table order, nb_index into them), when it can
    seed an update (``pogdiff.graph_update`` when its mode is exact, ``pogdiff.ann_graph`` when ANN):
    every row embedded by ``embedder`` and the graph made with ``cfg``'s settings (``_graph_key``,
    recorded on the density column by ``write_caption_graph``); else None."""
    table = open_table(connect(uri), CAPTIONS)
    stored = None if table is None else _stored_key(table)
    mode = next((m for m in ("exact", "ann") if stored == _graph_key(m, cfg)), None)
    if mode is None:
        return None
    t = table.to_arrow()
    if t.num_rows == 0 or pc.any(pc.not_equal(t.column("embedder"), embedder)).as_py():
        return None
    ids = t.column("caption_id").to_pylist()
    flat = pc.list_flatten(t.column("neighbour_ids"))  # "" (no neighbour) is no caption id: null, then -1
    nb = pc.fill_null(pc.index_in(flat, value_set=t.column("caption_id")), -1).to_numpy().astype(np.int64).reshape(t.num_rows, cfg.k)
    return CaptionGraph(ids=ids, captions=t.column("caption").to_pylist(), vectors=matrix(t.column(VECTOR), t.num_rows),
                        counts=t.column("count").to_numpy(), nb_index=nb, nb_sims=matrix(t.column("neighbour_sims"), t.num_rows),
                        density=t.column("density").to_numpy(), embedded=0, reused=t.num_rows, embedder=embedder, mode=mode)


def write_caption_graph(uri: str, graph: CaptionGraph, cfg: IndexConfig) -> WriteReport:
    """Make the captions table hold exactly ``graph``: upsert its rows whose content changed, delete the
    captions it no longer has, record how it was made (``_graph_key``); ANN index above the threshold.
    A re-run with the same graph writes nothing and makes no table version."""
    k = graph.nb_index.shape[1]
    new = _caption_rows(graph, k, graph.nb_sims, graph.density)
    old = read_caption_table(uri)
    _check_schema(uri, old, new.schema)
    report = _write(uri, new, old, new.schema.names[1:], cfg)
    table = open_table(connect(uri), CAPTIONS)
    gone = [] if old is None else sorted(set(old.column("caption_id").to_pylist()) - set(graph.ids))
    for start in range(0, len(gone), DELETE_BATCH):
        quoted = ", ".join(quote_sql(i) for i in gone[start : start + DELETE_BATCH])
        table.delete(f"caption_id IN ({quoted})")
    key = _graph_key(graph.mode, cfg)
    if _stored_key(table) != key:
        table.update_field_metadata({"path": "density", "metadata": {GRAPH_KEY: key}})
    return replace(report, deleted=len(gone), version=table.version)


def _search(table, queries: np.ndarray, limit: int, cfg: IndexConfig) -> pa.Table:
    q = table.search(queries, vector_column_name=VECTOR).distance_type("cosine").limit(limit).select(["caption_id", "_distance"])
    if _vector_index(table):
        # Hits only propose candidates: their cosines are recomputed exactly (graph_from_candidates), so a
        # wide list without PQ's slow refine step is enough. HNSW needs ef >= limit to return `limit` hits.
        q = q.ef(max(2 * limit, 64)) if cfg.ann_index == "IVF_HNSW_SQ" else q.nprobes(20)
    out = q.to_arrow()
    if "query_index" not in out.column_names:  # a single query vector comes back without it
        out = out.append_column("query_index", pa.array(np.zeros(out.num_rows, np.int32)))
    return out


def search_captions(uri: str, vector: np.ndarray, limit: int, cfg: IndexConfig) -> list[dict]:
    """Nearest stored captions to one vector ``[D]`` (L2-normalised), nearest first: dicts with caption_id,
    caption, count, density and the exact cosine ``similarity`` (the index only picks the rows)."""
    table = open_table(connect(uri), CAPTIONS)
    if table is None:
        return []
    ids = _search(table, vector[None, :].astype(np.float32), limit, cfg).column("caption_id").to_pylist()
    if not ids:
        return []
    quoted = ", ".join(quote_sql(i) for i in ids)
    rows = table.search().where(f"caption_id IN ({quoted})").select(["caption_id", "caption", "count", "density", VECTOR])
    found = rows.limit(len(ids)).to_arrow()
    sims = matrix(found.column(VECTOR), found.num_rows) @ vector.astype(np.float32)
    out = [{**r, "similarity": float(s)} for r, s in zip(found.drop_columns([VECTOR]).to_pylist(), sims)]
    return sorted(out, key=lambda r: -r["similarity"])


def stored_extractors(uri: str) -> set[str]:
    """The names of the feature extractors whose image features the table holds."""
    table = open_table(connect(uri), IMAGE_FEATURES)
    if table is None:
        return set()
    return set(pc.unique(table.to_arrow().column("extractor")).to_pylist())


def known_feature_ids(uri: str, extractor: str) -> set[str]:
    table = open_table(connect(uri), IMAGE_FEATURES)
    if table is None:
        return set()
    t = table.to_arrow().select(["image_id", "extractor"])
    return {i for i, e in zip(t.column("image_id").to_pylist(), t.column("extractor").to_pylist()) if e == extractor}


def write_image_features(uri: str, image_ids: list[str], extractor: str, features: np.ndarray,
                         retention_days: float = IndexConfig.model_fields["version_retention_days"].default) -> WriteReport:
    """Insert features ``[N, F]`` of images not yet featurised (callers pass only new ids); versions
    older than ``retention_days`` are pruned (``_optimize``)."""
    db = connect(uri)
    if not image_ids:
        table = open_table(db, IMAGE_FEATURES)
        return WriteReport(rows=0, written=0, version=table.version if table is not None else 0)
    rows = pa.table(
        {
            "image_id": image_ids,
            "extractor": [extractor] * len(image_ids),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), features.shape[1]),
        },
        schema=image_features_schema(features.shape[1]),
    )
    existing = open_table(db, IMAGE_FEATURES)
    if existing is not None and existing.schema.field("feature").type.list_size != features.shape[1]:
        # Another extractor of another width (index.image_feature changed): the table is a cache of the
        # current extractor's features, so it is replaced, as a new table version, by the new ones.
        check_writable(db.uri)
        table = db.create_table(IMAGE_FEATURES, rows, mode="overwrite")
        table.create_scalar_index("image_id", replace=True)
    else:
        table = _upsert(db, IMAGE_FEATURES, "image_id", rows, retention_days)
    return WriteReport(rows=len(image_ids), written=len(image_ids), version=table.version)


def read_image_features(uri: str, extractor: str, version: int | None = None) -> dict[str, np.ndarray]:
    """image id -> feature under ``extractor``, from the table now or at ``version``."""
    table = open_table(connect(uri), IMAGE_FEATURES, version)
    if table is None:
        return {}
    t = table.to_arrow()
    feats = np.asarray(t.column("feature").combine_chunks().flatten()).reshape(t.num_rows, -1)
    return {i: f for i, e, f in zip(t.column("image_id").to_pylist(), t.column("extractor").to_pylist(), feats) if e == extractor}


def tag_versions(uri: str, versions: dict[str, int], tag: str) -> None:
    """Point LanceDB tag ``tag`` of each named table at its version (created or moved): a tagged
    version is never pruned (``_optimize``), so the lineage of what the tag marks keeps resolving."""
    db = connect(uri)
    for name, version in versions.items():
        table = db.open_table(name)
        if tag in table.tags.list():
            table.tags.update(tag, version)
        else:
            table.tags.create(tag, version)


def table_versions(uri: str) -> dict[str, int]:
    db = connect(uri)
    return {name: db.open_table(name).version for name in db.list_tables().tables}
