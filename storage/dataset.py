"""The Parquet image dataset as stored: its layout, schemas and lock, and reading it back (the
accepted rows, the quarantine, snapshots and their manifests). Writing is :mod:`storage.parquet`.

Layout of a dataset (a local directory, or a prefix of an S3 bucket: ``s3://bucket/dataset``)::

    dataset/images/part-<batch>-<n>.parquet       accepted rows, DATASET_SCHEMA (partitioned by batch)
    dataset/quarantine/part-<batch>-<n>.parquet   rejected inputs, QUARANTINE_SCHEMA
    dataset/snapshots/<snapshot_id>.json          manifest of a snapshot: part files, row count
    dataset/.lock                                 held by an ingest or a snapshot pin
    dataset/.pogdiff-generation                   on S3 only: a random id, written once (storage.fingerprint)

Readers only look at ``part-*.parquet``, so a part being written is never seen: locally it has a
temporary name until it is complete, on S3 it is one PUT of the whole object (storage.location).

**The lock.** Locally ``.lock`` is a file held with POSIX ``flock``, released by the OS when its
holder dies. On S3 it is a lease object (:mod:`storage.lease`): created with ``If-None-Match: *``
(one claimant wins), renewed by its holder every 20 s, taken over by a waiter once it has not been
renewed for 60 s (a crashed holder blocks the dataset for at most that long), deleted on release.
A holder that lost its lease stops before its next write (``LeaseLost``).

**Splits.** Each row is a training photo or a held-out one (``split``: ``train`` | ``holdout``).
The split is a column of its own rather than a key of ``metadata``: it decides what may ever be
trained on, so readers select on it with a Parquet predicate (``read_images(split=...)``) instead
of parsing every row's JSON, and no other source column can be mistaken for it. Part files are immutable (snapshot manifests list
them), so datasets written before the column existed are not rewritten: their parts lack it, it
reads as null, and null reads as ``train``. A row's split never changes: its id is fixed by its
bytes and caption, and the ingest quarantines the same image in the other split
(``Reason.SPLIT_CONFLICT``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from storage import lease
from storage.fingerprint import store_generation
from storage.items import SPLITS, Split
from storage.location import Location

try:  # POSIX only; elsewhere ingests into one dataset must not run concurrently
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DATASET_SCHEMA",
    "QUARANTINE_SCHEMA",
    "caption_counts",
    "exists",
    "holdout_ids",
    "pin_snapshot",
    "read_images",
    "read_manifest",
    "read_quarantine",
    "snapshot_id",
    "snapshot_summary",
]

DATASET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # sha256(original bytes + b"\0" + caption)[:32]
        pa.field("caption", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # normalised square RGB image, PNG or WebP
        pa.field("image_sha256", pa.string(), nullable=False),  # of the original bytes alone
        pa.field("format", pa.string(), nullable=False),  # the original's PIL format: PNG, JPEG, ...
        pa.field("width", pa.int32(), nullable=False),  # the original's size
        pa.field("height", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the source as given
        pa.field("key", pa.string(), nullable=False),  # where in the source: path, file:row, shard:key
        pa.field("metadata", pa.string(), nullable=False),  # JSON object of the extra columns
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("batch_id", pa.string(), nullable=False),
        # train | holdout; null only in parts written before the column existed, and read as train
        pa.field("split", pa.string(), nullable=True),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # a Reason value
        pa.field("message", pa.string(), nullable=False),
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

IMAGES_DIR = "images"
QUARANTINE_DIR = "quarantine"
SNAPSHOTS_DIR = "snapshots"
PART_GLOB = "part-*.parquet"
LOCK = ".lock"

Where = str | Path | Location  # a local path, an s3://bucket/prefix URI, or its Location


@contextmanager
def locked(dataset: Location) -> Iterator[Callable[[], None]]:
    """Hold the dataset's exclusive lock (one ingest or snapshot pin at a time); yields ``check()``,
    which raises LeaseLost once an S3 lease has been lost (see the module's docstring)."""
    if dataset.remote:
        with lease.hold(*dataset.bucket_key(dataset.path(LOCK))) as held:
            yield held.check
        return
    with open(dataset.path(LOCK), "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield lambda: None
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def create(dataset: Location) -> None:
    """Make the dataset exist, so that it reads as empty, not missing: its folders locally; on S3,
    which has no empty folders, its generation marker."""
    if dataset.remote:
        store_generation(dataset.uri)
        return
    for sub in (IMAGES_DIR, QUARANTINE_DIR):
        Path(dataset.path(sub)).mkdir(parents=True, exist_ok=True)


def exists(dataset: Where) -> bool:
    """Whether there is a dataset at ``dataset`` (a folder, or any object under the S3 prefix)."""
    return Location.of(dataset).is_dir()


def part_files(dataset: Location, sub: str) -> list[str]:
    """The complete part files under ``dataset/sub`` (paths in ``dataset.fs``), sorted;
    FileNotFoundError if there is no dataset."""
    if not dataset.is_dir():
        raise FileNotFoundError(f"dataset not found: {dataset.uri}")
    return dataset.list(sub, PART_GLOB)


def split_filter(split: Split | None) -> pc.Expression | None:
    """The Parquet predicate selecting the rows of ``split`` (None: every row); a null split, from a
    part written before the column existed, is ``train``."""
    if split is None:
        return None
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None, got '{split}'")
    if split == "train":
        return pc.field("split").is_null() | (pc.field("split") == "train")
    return pc.field("split") == split


def read_parts(dataset: Location, files: list[str], schema: pa.Schema, columns: list[str] | None = None,
               split: Split | None = None) -> pa.Table:
    """``files`` (of ``dataset.fs``) as one table of ``schema`` (``columns`` of it), only the rows of
    ``split`` when given; an empty table when there are none."""
    if columns is not None:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the schema has {schema.names}")
    predicate = split_filter(split)
    if not files:
        table = schema.empty_table()
        return table.select(columns) if columns is not None else table
    data = pads.dataset(files, schema=schema, format="parquet", filesystem=dataset.fs)
    return data.to_table(columns=columns, filter=predicate)


def iter_batches(dataset: Location, files: list[str], schema: pa.Schema, columns: list[str],
                 split: Split | None = None) -> Iterator[pa.RecordBatch]:
    """``columns`` of ``files`` (the rows of ``split`` when given) in batches of 256 rows (bounded memory)."""
    predicate = split_filter(split)
    if files:
        data = pads.dataset(files, schema=schema, format="parquet", filesystem=dataset.fs)
        yield from data.to_batches(columns=columns, filter=predicate, batch_size=256)


def snapshot_files(dataset: Location, snapshot: str | None) -> list[str]:
    """The image part files of ``snapshot`` (its manifest), or of the dataset as it is now (None)."""
    if snapshot is None:
        return part_files(dataset, IMAGES_DIR)
    if snapshot == "empty":
        return []
    files = [dataset.path(f["path"]) for f in read_manifest(dataset, snapshot)["files"]]
    gone = dataset.missing(files)
    if gone:
        raise FileNotFoundError(f"snapshot {snapshot} of {dataset.uri} lists {len(gone)} part file(s) that no longer exist "
                                f"(e.g. {dataset.display(dataset.relative(gone[0]))})")
    return files


def read_images(dataset: Where, columns: list[str] | None = None, snapshot: str | None = None,
                split: Split | None = None) -> pa.Table:
    """The accepted image rows (DATASET_SCHEMA, or ``columns`` of it), sorted by id: of ``snapshot``
    (a pinned snapshot id, read from its manifest) or, by default, of the dataset as it is now; of
    one ``split`` (``train`` or ``holdout``) or, by default, all of them. A ``split`` column read
    from parts written before it existed holds ``train``, never null."""
    dataset = Location.of(dataset)
    files = snapshot_files(dataset, snapshot)
    wanted = list(DATASET_SCHEMA.names) if columns is None else list(columns)
    read = wanted if "id" in wanted else [*wanted, "id"]
    table = read_parts(dataset, files, DATASET_SCHEMA, read, split).sort_by("id")
    if "split" in wanted:
        at = table.schema.get_field_index("split")
        table = table.set_column(at, table.schema.field(at), pc.fill_null(table.column(at), "train"))
    return table.select(wanted)


def read_quarantine(dataset: Where) -> pa.Table:
    """All quarantine rows (QUARANTINE_SCHEMA), sorted by source, key and reason."""
    dataset = Location.of(dataset)
    table = read_parts(dataset, part_files(dataset, QUARANTINE_DIR), QUARANTINE_SCHEMA)
    return table.sort_by([("source", "ascending"), ("key", "ascending"), ("reason", "ascending")])


def snapshot_id(dataset: Where) -> str:
    """Content id of the accepted rows: sha256 over the sorted row ids, each followed by ``" holdout"``
    if the row is held out and by a newline, first 16 hex digits; ``"empty"`` when there are no rows.
    Independent of part files and batches; a dataset without held-out rows keeps the id it had before
    splits existed."""
    return snapshot_summary(dataset)[0]


def snapshot_summary(dataset: Where) -> tuple[str, int]:
    """``(snapshot_id, rows)`` from one read of the id and split columns."""
    dataset = Location.of(dataset)
    table = read_parts(dataset, part_files(dataset, IMAGES_DIR), DATASET_SCHEMA, ["id", "split"])
    return snapshot_of(table.column("id").to_pylist(), holdout_ids(table)), table.num_rows


def holdout_ids(table: pa.Table) -> set[str]:
    """The ids of the held-out rows of ``table`` (its ``id`` and ``split`` columns)."""
    return set(table.filter(pc.equal(table.column("split"), "holdout")).column("id").to_pylist())


def snapshot_of(ids: list[str], holdout: set[str] | frozenset[str] = frozenset()) -> str:
    """The snapshot id of the rows ``ids``, of which ``holdout`` are held out (see :func:`snapshot_id`)."""
    if not ids:
        return "empty"
    digest = hashlib.sha256()
    for row_id in sorted(ids):
        digest.update(row_id.encode("ascii") + (b" holdout\n" if row_id in holdout else b"\n"))
    return digest.hexdigest()[:16]


def pin_snapshot(dataset: Where) -> tuple[str, int]:
    """``(snapshot_id, rows)`` of the dataset now, with its manifest written, so later reads of that
    snapshot see exactly these rows whatever is ingested meanwhile. Waits for an ingest in progress
    (the dataset lock), so a snapshot never holds half an ingest."""
    dataset = Location.of(dataset)
    part_files(dataset, IMAGES_DIR)  # a missing dataset is one clear error
    with locked(dataset) as still_held:
        table = read_parts(dataset, part_files(dataset, IMAGES_DIR), DATASET_SCHEMA, ["id", "split"])
        held = holdout_ids(table)
        snapshot = snapshot_of(table.column("id").to_pylist(), held)
        still_held()
        write_manifest(dataset, snapshot, table.num_rows, "pinned", len(held))
    return snapshot, table.num_rows


def caption_counts(dataset: Where, snapshot: str | None = None) -> dict[str, int]:
    """Training images per caption (of ``snapshot``, default the dataset now), keys in sorted order.

    Held-out rows are not counted, so the caption index built from these counts never holds a
    held-out caption: it is never a neighbour and never adds to a density."""
    dataset = Location.of(dataset)
    captions = read_parts(dataset, snapshot_files(dataset, snapshot), DATASET_SCHEMA, ["caption"], "train").column("caption")
    if len(captions) == 0:
        return {}
    counts = pc.value_counts(captions).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def manifest_path(dataset: Where, snapshot: str) -> str | Path:
    """Where the manifest of ``snapshot`` lives: ``<dataset>/snapshots/<snapshot>.json`` (a Path for a
    local dataset, else a URI)."""
    return Location.of(dataset).display(_manifest(snapshot))


def _manifest(snapshot: str) -> str:
    return f"{SNAPSHOTS_DIR}/{snapshot}.json"


def write_manifest(dataset: Location, snapshot: str, rows: int, batch_id: str, holdout_rows: int = 0) -> str:
    """Record which part files make up ``snapshot`` and how many of its ``rows`` are held out
    (written once; a re-run finds it in place)."""
    if snapshot == "empty":
        return ""
    path = dataset.path(_manifest(snapshot))
    if not dataset.exists(path):
        parts = part_files(dataset, IMAGES_DIR)
        files = [
            {"path": dataset.relative(p), "rows": pq.read_metadata(p, filesystem=dataset.fs).num_rows, "bytes": info.size}
            for p, info in zip(parts, dataset.fs.get_file_info(parts))
        ]
        manifest = {
            "snapshot_id": snapshot,
            "rows": rows,
            "holdout_rows": holdout_rows,
            "content_hash": "sha256 over the sorted row ids, each followed by ' holdout' if held out and a newline, "
                            "first 16 hex digits (= snapshot_id)",
            "files": files,
            "batch_id": batch_id,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        data = json.dumps(manifest, indent=1).encode()
        dataset.write(path, lambda handle: handle.write(data))
    return _manifest(snapshot)


def read_manifest(dataset: Where, snapshot: str) -> dict:
    """The manifest of ``snapshot``: ``{snapshot_id, rows, holdout_rows, files: [{path, rows, bytes}], batch_id,
    created_at}`` (``holdout_rows`` absent from manifests written before splits existed)."""
    dataset = Location.of(dataset)
    path = dataset.path(_manifest(snapshot))
    if not dataset.exists(path):
        raise FileNotFoundError(f"no manifest for snapshot {snapshot} in {dataset.uri}")
    return json.loads(dataset.read_bytes(path).decode("utf-8"))

