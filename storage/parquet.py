"""The Parquet image dataset: ingest a caption–image source, read it back.

Layout of a dataset (a directory)::

    dataset/images/part-<batch>-<n>.parquet       accepted rows, DATASET_SCHEMA (partitioned by batch)
    dataset/quarantine/part-<batch>-<n>.parquet   rejected inputs, QUARANTINE_SCHEMA
    dataset/snapshots/<snapshot_id>.json          manifest of a snapshot: part files, row count

Sources (:mod:`storage.sources`): an image folder with a captions file, Parquet files with image
bytes, or WebDataset ``.tar`` shards. Images are checked and normalised (:mod:`storage.validate`)
in a pool of threads or of worker processes (spawned, never forked).

Guarantees:

* **Nothing is silently dropped.** Every input is accepted, found unchanged (already in the
  dataset), or written to the quarantine with a reason code from :class:`Reason` and a message.
* **Idempotent.** A row's id is a content hash of the original image bytes and the caption, so
  ingesting the same source twice writes no new image rows; quarantine rows are keyed by
  ``(source, key, reason)`` and are written once.
* **Atomic.** Each part file is written under a temporary name in the same directory, fsynced and
  moved into place with ``os.replace``; readers only look at ``part-*.parquet``, so a crash never
  exposes a partial file, only complete parts. A crashed ingest is finished by running it again.
* **Bounded memory.** The source is streamed ``chunk_rows`` inputs at a time, fewer when their image
  bytes reach workers x ``max_image_bytes``; at most two chunks are in flight (one being checked by
  the pool while the previous one is written). No image or tar member above its byte cap is read.

One ingest at a time holds an exclusive lock on ``dataset/.lock`` (POSIX ``flock``; released by the
OS if the process dies), so concurrent ingests into the same dataset are serialised, not
interleaved: the second sees every id the first wrote, and no id is written twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from pogdiff.atomic import TMP_SUFFIX, write_atomic
from storage.config import IngestConfig
from storage.sources import Item, Reason, SourceError, check_source, open_source
from storage.validate import Checked, check_many, init_worker, own_pixel_limit

try:  # POSIX only; elsewhere ingests into one dataset must not run concurrently
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DATASET_SCHEMA",
    "QUARANTINE_SCHEMA",
    "IngestReport",
    "Reason",
    "SourceError",
    "caption_counts",
    "check_source",
    "ingest",
    "read_images",
    "read_manifest",
    "read_quarantine",
    "snapshot_id",
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
_PART_GLOB = "part-*.parquet"
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TASK_ITEMS = 8  # items per pool task: amortises inter-process traffic, still balances the load

ProgressFn = Callable[[int, int | None], None]  # (inputs handled so far, total inputs if known)


class IngestReport(BaseModel):
    """What one ingest did. ``rejected`` counts this run's rejected inputs by reason code (including
    inputs already in the quarantine from an earlier run, which are not written again)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted: int  # new image rows written
    unchanged: int  # inputs whose id was already in the dataset
    rejected: dict[str, int]
    snapshot_id: str  # snapshot_id(dataset) after the ingest
    total_rows: int  # image rows in the dataset after the ingest
    batch_id: str
    source_kind: str  # folder | parquet | webdataset
    manifest: str  # the snapshot manifest, relative to the dataset ("" for an empty dataset)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------



def _chunk(items: Iterator[Item], rows: int, max_bytes: int) -> list[Item]:
    """The next at most ``rows`` items, fewer once their in-memory image bytes reach ``max_bytes``
    (items that hold their encoded image: Parquet cells, tar members; paths are read by the checker)."""
    chunk: list[Item] = []
    held = 0
    for item in items:
        chunk.append(item)
        held += len(item.data) if item.data is not None else 0
        if len(chunk) >= rows or held >= max_bytes:
            break
    return chunk


def _write_table(table: pa.Table, final: Path) -> None:
    # The image column holds PNG/WebP bytes already: compressing it again costs time and saves nothing.
    compression = {name: "none" if name == "image" else "snappy" for name in table.column_names}
    other = [name for name in table.column_names if name != "image"]
    write_atomic(final, lambda f: pq.write_table(table, f, compression=compression, use_dictionary=other))


def _next_part(directory: Path, batch_id: str) -> int:
    """First free part number for ``batch_id``: a re-used batch id never overwrites a part."""
    used = [-1]
    for path in directory.glob(f"part-{batch_id}-*.parquet"):
        tail = path.stem[len(f"part-{batch_id}-") :]
        if tail.isdigit():
            used.append(int(tail))
    return max(used) + 1


@contextmanager
def _locked(dataset: Path) -> Iterator[None]:
    with open(dataset / ".lock", "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _parts(dataset: Path, sub: str) -> list[Path]:
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise FileNotFoundError(f"dataset not found: {dataset}")
    directory = dataset / sub
    return sorted(directory.glob(_PART_GLOB)) if directory.is_dir() else []


def _read(files: list[Path], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    if columns is not None:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the schema has {schema.names}")
    if not files:
        table = schema.empty_table()
        return table.select(columns) if columns is not None else table
    data = pads.dataset([str(f) for f in files], schema=schema, format="parquet")
    return data.to_table(columns=columns)


def _batches(files: list[Path], schema: pa.Schema, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if files:
        data = pads.dataset([str(f) for f in files], schema=schema, format="parquet")
        yield from data.to_batches(columns=columns, batch_size=256)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _snapshot_files(dataset: Path, snapshot: str | None) -> list[Path]:
    """The image part files of ``snapshot`` (its manifest), or of the dataset as it is now (None)."""
    if snapshot is None:
        return _parts(dataset, IMAGES_DIR)
    if snapshot == "empty":
        return []
    files = [Path(dataset) / f["path"] for f in read_manifest(dataset, snapshot)["files"]]
    gone = [f for f in files if not f.is_file()]
    if gone:
        raise FileNotFoundError(f"snapshot {snapshot} of {dataset} lists {len(gone)} part file(s) that no longer exist (e.g. {gone[0]})")
    return files


def read_images(dataset: Path, columns: list[str] | None = None, snapshot: str | None = None) -> pa.Table:
    """All accepted image rows (DATASET_SCHEMA, or ``columns`` of it), sorted by id: of ``snapshot``
    (a pinned snapshot id, read from its manifest) or, by default, of the dataset as it is now."""
    files = _snapshot_files(dataset, snapshot)
    wanted = list(DATASET_SCHEMA.names) if columns is None else list(columns)
    read = wanted if "id" in wanted else [*wanted, "id"]
    table = _read(files, DATASET_SCHEMA, read).sort_by("id")
    return table.select(wanted)


def read_quarantine(dataset: Path) -> pa.Table:
    """All quarantine rows (QUARANTINE_SCHEMA), sorted by source, key and reason."""
    table = _read(_parts(dataset, QUARANTINE_DIR), QUARANTINE_SCHEMA)
    return table.sort_by([("source", "ascending"), ("key", "ascending"), ("reason", "ascending")])


def snapshot_id(dataset: Path) -> str:
    """Content id of the accepted rows: sha256 over the sorted row ids (each followed by a newline),
    first 16 hex digits; ``"empty"`` when there are no rows. Independent of part files and batches."""
    return snapshot_summary(dataset)[0]


def snapshot_summary(dataset: Path) -> tuple[str, int]:
    """``(snapshot_id, rows)`` from one read of the id column."""
    ids = _read(_parts(dataset, IMAGES_DIR), DATASET_SCHEMA, ["id"]).column("id").to_pylist()
    return _snapshot_of(ids), len(ids)


def _snapshot_of(ids: list[str]) -> str:
    if not ids:
        return "empty"
    digest = hashlib.sha256()
    for row_id in sorted(ids):
        digest.update(row_id.encode("ascii") + b"\n")
    return digest.hexdigest()[:16]


def pin_snapshot(dataset: Path) -> tuple[str, int]:
    """``(snapshot_id, rows)`` of the dataset now, with its manifest written, so later reads of that
    snapshot see exactly these rows whatever is ingested meanwhile. Waits for an ingest in progress
    (the dataset lock), so a snapshot never holds half an ingest."""
    dataset = Path(dataset)
    _parts(dataset, IMAGES_DIR)  # a missing dataset is one clear error
    with _locked(dataset):
        snapshot, rows = snapshot_summary(dataset)
        _write_manifest(dataset, snapshot, rows, "pinned")
    return snapshot, rows


def caption_counts(dataset: Path, snapshot: str | None = None) -> dict[str, int]:
    """Training images per caption (of ``snapshot``, default the dataset now), keys in sorted order."""
    captions = _read(_snapshot_files(dataset, snapshot), DATASET_SCHEMA, ["caption"]).column("caption")
    if len(captions) == 0:
        return {}
    counts = pc.value_counts(captions).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def _manifest_path(dataset: Path, snapshot: str) -> Path:
    return dataset / SNAPSHOTS_DIR / f"{snapshot}.json"


def _write_manifest(dataset: Path, snapshot: str, rows: int, batch_id: str) -> str:
    """Record which part files make up ``snapshot`` (written once; a re-run finds it in place)."""
    if snapshot == "empty":
        return ""
    path = _manifest_path(dataset, snapshot)
    if not path.exists():
        files = [
            {"path": p.relative_to(dataset).as_posix(), "rows": pq.ParquetFile(p).metadata.num_rows, "bytes": p.stat().st_size}
            for p in _parts(dataset, IMAGES_DIR)
        ]
        manifest = {
            "snapshot_id": snapshot,
            "rows": rows,
            "content_hash": "sha256 over the sorted row ids, first 16 hex digits (= snapshot_id)",
            "files": files,
            "batch_id": batch_id,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(manifest, indent=1).encode()
        write_atomic(path, lambda handle: handle.write(data))
    return path.relative_to(dataset).as_posix()


def read_manifest(dataset: Path, snapshot: str) -> dict:
    """The manifest of ``snapshot``: ``{snapshot_id, rows, files: [{path, rows, bytes}], batch_id, created_at}``."""
    path = _manifest_path(Path(dataset), snapshot)
    if not path.exists():
        raise FileNotFoundError(f"no manifest for snapshot {snapshot} in {dataset}")
    return json.loads(path.read_text(encoding="utf-8"))


@contextmanager
def _pool(cfg: IngestConfig, workers: int) -> Iterator[Callable[[list[Item]], Iterator[Checked]]]:
    """``map(items) -> checked`` over ``workers`` processes or threads (in order; lazy results).

    Processes are spawned, never forked: a forked child would inherit locks and the open stores of a
    flow process (LanceDB is not fork-safe). ``workers == 1`` checks in this process.
    """
    fn = partial(check_many, cfg=cfg)

    def batched(executor: Executor | None, items: list[Item]) -> Iterator[Checked]:
        tasks = [items[i : i + _TASK_ITEMS] for i in range(0, len(items), _TASK_ITEMS)]
        results = executor.map(fn, tasks) if executor is not None else map(fn, tasks)
        return itertools.chain.from_iterable(results)

    with ExitStack() as stack:
        executor: Executor | None = None
        if workers > 1 and cfg.parallelism == "processes":
            context = multiprocessing.get_context("spawn")
            executor = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker))
        else:
            stack.enter_context(own_pixel_limit())
            if workers > 1:
                executor = stack.enter_context(ThreadPoolExecutor(workers))
        yield partial(batched, executor)


def _image_table(rows: list[Checked], source: str, now: datetime, batch_id: str) -> pa.Table:
    return pa.table(
        {
            "id": [r.id for r in rows],
            "caption": [r.item.caption for r in rows],
            "image": [r.image for r in rows],
            "image_sha256": [r.image_sha256 for r in rows],
            "format": [r.format for r in rows],
            "width": [r.width for r in rows],
            "height": [r.height for r in rows],
            "source": [source] * len(rows),
            "key": [r.item.key for r in rows],
            "metadata": [r.item.metadata for r in rows],
            "ingested_at": [now] * len(rows),
            "batch_id": [batch_id] * len(rows),
        },
        schema=DATASET_SCHEMA,
    )


def _quarantine_table(rejects: list[tuple[str, str, str]], source: str, now: datetime, batch_id: str) -> pa.Table:
    keys, reasons, messages = (list(col) for col in zip(*rejects))
    return pa.table(
        {
            "source": [source] * len(keys),
            "key": keys,
            "reason": reasons,
            "message": messages,
            "batch_id": [batch_id] * len(keys),
            "recorded_at": [now] * len(keys),
        },
        schema=QUARANTINE_SCHEMA,
    )


def ingest(
    source: Path,
    dataset: Path,
    cfg: IngestConfig,
    batch_id: str | None = None,
    workers: int | None = None,
    *,
    chunk_rows: int = 256,
    on_progress: ProgressFn | None = None,
) -> IngestReport:
    """Ingest ``source`` (folder + captions file, Parquet, or WebDataset shards) into ``dataset``.

    Each input is accepted (its normalised image written to ``dataset/images``), found unchanged
    (its id is already there) or quarantined with a :class:`Reason` (``dataset/quarantine``).
    Inputs are processed ``chunk_rows`` at a time by ``workers`` (default: CPU count) processes or
    threads (``cfg.parallelism``); each chunk writes at most one image part and one quarantine
    part, atomically. ``on_progress(done, total)`` is called after each chunk.

    Raises SourceError (one line naming the folder or file) when the source cannot be read at all;
    in that case the dataset is not created or changed.
    """
    source, dataset = Path(source), Path(dataset)
    batch_id = batch_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    if not _BATCH_ID.match(batch_id):
        raise ValueError(f"batch_id {batch_id!r} must match {_BATCH_ID.pattern} (it names files)")
    workers = workers or os.cpu_count() or 1
    if workers < 1 or chunk_rows < 1:
        raise ValueError("workers and chunk_rows must be at least 1")
    source_name = str(source)
    now = datetime.now(timezone.utc)
    images_dir, quarantine_dir = dataset / IMAGES_DIR, dataset / QUARANTINE_DIR

    with open_source(source, cfg, batch_rows=chunk_rows) as stream:  # fails before the dataset is touched
        for directory in (images_dir, quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        with _locked(dataset), _pool(cfg, workers) as check:
            for directory in (images_dir, quarantine_dir, dataset / SNAPSHOTS_DIR):  # left by a crash; never visible
                for stale in directory.glob(f".*{TMP_SUFFIX}"):
                    stale.unlink(missing_ok=True)
            image_files = _parts(dataset, IMAGES_DIR)
            existing = set(_read(image_files, DATASET_SCHEMA, ["id"]).column("id").to_pylist())
            quarantine = _read(_parts(dataset, QUARANTINE_DIR), QUARANTINE_SCHEMA, ["source", "key", "reason"])
            recorded = set(zip(*(quarantine.column(c).to_pylist() for c in ("source", "key", "reason"))))
            owner: dict[str, str] = {}  # image sha256 -> id of the accepted row; only for the reject policy
            if cfg.same_image_other_caption == "reject":
                for batch in _batches(image_files, DATASET_SCHEMA, ["id", "image_sha256"]):
                    for row_id, digest in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        owner.setdefault(digest, row_id)
            next_image, next_quarantine = _next_part(images_dir, batch_id), _next_part(quarantine_dir, batch_id)
            seen: dict[str, str] = {}  # id -> key of the input that was ingested (or found unchanged)
            accepted = unchanged = done = 0
            rejected: Counter[str] = Counter()

            def commit(chunk: list[Item], checked: Iterator[Checked]) -> None:
                nonlocal next_image, next_quarantine, accepted, unchanged, done
                new_rows: list[Checked] = []
                new_rejects: list[tuple[str, str, str]] = []

                def reject(key: str, reason: Reason, message: str) -> None:
                    rejected[reason.value] += 1
                    if (source_name, key, reason.value) not in recorded:
                        recorded.add((source_name, key, reason.value))
                        new_rejects.append((key, reason.value, message))

                for item in chunk:
                    if item.reason is not None:
                        reject(item.key, item.reason, item.message)
                        continue
                    result = next(checked)
                    if result.reason is not None:
                        reject(item.key, result.reason, result.message)
                    elif result.id in seen:
                        reject(item.key, Reason.DUPLICATE, f"{item.key}: same image and caption as '{seen[result.id]}'")
                    elif result.id in existing:
                        seen[result.id] = item.key
                        unchanged += 1
                    elif cfg.same_image_other_caption == "reject" and result.image_sha256 in owner:
                        reject(
                            item.key,
                            Reason.SAME_IMAGE_OTHER_CAPTION,
                            f"{item.key}: the same image is already accepted with another caption "
                            f"(row id {owner[result.image_sha256]})",
                        )
                    else:
                        seen[result.id] = item.key
                        owner.setdefault(result.image_sha256, result.id)
                        new_rows.append(result)
                if new_rows:
                    table = _image_table(new_rows, source_name, now, batch_id)
                    _write_table(table, images_dir / f"part-{batch_id}-{next_image:05d}.parquet")
                    next_image += 1
                    existing.update(r.id for r in new_rows)
                    accepted += len(new_rows)
                if new_rejects:
                    table = _quarantine_table(new_rejects, source_name, now, batch_id)
                    _write_table(table, quarantine_dir / f"part-{batch_id}-{next_quarantine:05d}.parquet")
                    next_quarantine += 1
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, stream.total)

            # Two chunks in flight: the pool checks chunk n+1 while chunk n is deduplicated and written.
            in_flight: deque[tuple[list[Item], Iterator[Checked]]] = deque()
            while chunk := _chunk(stream.items, chunk_rows, workers * cfg.max_image_bytes):
                in_flight.append((chunk, check([item for item in chunk if item.reason is None])))
                if len(in_flight) > 1:
                    commit(*in_flight.popleft())
            while in_flight:
                commit(*in_flight.popleft())
            snapshot = _snapshot_of(list(existing))
            manifest = _write_manifest(dataset, snapshot, len(existing), batch_id)

    return IngestReport(
        accepted=accepted,
        unchanged=unchanged,
        rejected=dict(sorted(rejected.items())),
        snapshot_id=snapshot,
        total_rows=len(existing),
        batch_id=batch_id,
        source_kind=stream.kind,
        manifest=manifest,
    )
