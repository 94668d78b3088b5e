"""Ingest a caption–image source into the Parquet image dataset (:mod:`storage.dataset` holds its
layout and reads it back).

Sources (:mod:`storage.sources`): an image folder with a captions file, Parquet files with image
bytes, or WebDataset ``.tar`` shards. Images are checked and normalised (:mod:`storage.validate`)
in a pool of threads or of worker processes (spawned, never forked).

Guarantees:

* **Nothing is silently dropped.** Every input is accepted, found unchanged (already in the
  dataset), or written to the quarantine with a reason code from :class:`~storage.items.Reason` and a message.
* **Idempotent.** A row's id is a content hash of the original image bytes and the caption, so
  ingesting the same source twice writes no new image rows; quarantine rows are keyed by
  ``(source, key, reason)`` and are written once.
* **Held-out photos stay held out.** A source's split column marks rows ``train`` or ``holdout``
  (:mod:`storage.items`). An image whose bytes are already accepted in the other split (in the
  dataset or earlier in this run) is quarantined (``split_conflict``): the same photo trained on
  and held out would score memory as generalisation.
* **Atomic.** Each part file is written whole (:class:`~storage.location.Location`): locally under a
  temporary name in the same directory, fsynced and moved into place with ``os.replace``; on S3 by
  one PUT of the whole object to its final key. Readers only look at ``part-*.parquet``, so a crash
  never exposes a partial file, only complete parts. A crashed ingest is finished by running it again.
* **Bounded memory.** The source is streamed ``chunk_rows`` inputs at a time, fewer when their image
  bytes reach workers x ``max_image_bytes``; at most two chunks are in flight (one being checked by
  the pool while the previous one is written). No image or tar member above its byte cap is read.

One ingest at a time holds the dataset's exclusive lock, ``dataset/.lock`` (locally POSIX ``flock``,
released by the OS if the process dies; on S3 an expiring lease, :mod:`storage.dataset`), so
concurrent ingests into the same dataset are serialised, not interleaved: the second sees every id
the first wrote, and no id is written twice.
"""

from __future__ import annotations

import itertools
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
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from pogdiff.atomic import TMP_SUFFIX
from storage.config import IngestConfig
from storage.dataset import (
    DATASET_SCHEMA,
    IMAGES_DIR,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    SNAPSHOTS_DIR,
    Where,
    create,
    holdout_ids,
    iter_batches,
    locked,
    part_files,
    read_parts,
    snapshot_of,
    write_manifest,
)
from storage.items import Item, Reason, Split
from storage.location import Location
from storage.sources import open_source
from storage.validate import Checked, check_many, init_worker, own_pixel_limit

__all__ = ["IngestReport", "ingest"]

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


def _write_table(dataset: Location, table: pa.Table, final: str) -> None:
    # The image column holds PNG/WebP bytes already: compressing it again costs time and saves nothing.
    compression = {name: "none" if name == "image" else "snappy" for name in table.column_names}
    other = [name for name in table.column_names if name != "image"]
    dataset.write(final, lambda f: pq.write_table(table, f, compression=compression, use_dictionary=other))


def _next_part(dataset: Location, sub: str, batch_id: str) -> int:
    """First free part number for ``batch_id`` in ``sub``: a re-used batch id never overwrites a part."""
    used = [-1]
    for path in dataset.list(sub, f"part-{batch_id}-*.parquet"):
        tail = path.rsplit("/", 1)[-1][len(f"part-{batch_id}-") : -len(".parquet")]
        if tail.isdigit():
            used.append(int(tail))
    return max(used) + 1


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
            "split": [r.item.split for r in rows],
        },
        schema=DATASET_SCHEMA,
    )


def _stored_ids(dataset: Location, files: list[str]) -> tuple[set[str], set[str]]:
    """The ids of the rows in ``files``, and those of its held-out rows."""
    table = read_parts(dataset, files, DATASET_SCHEMA, ["id", "split"])
    return set(table.column("id").to_pylist()), holdout_ids(table)


class _SplitOwners:
    """Which accepted row holds each image (by the sha256 of its original bytes) in each split, to
    keep one photo out of both. The held-out rows of the dataset are read up front (few); the
    training rows, every other row, only when the first held-out input needs them, so a source
    without held-out photos never reads them. Rows accepted by this run are added as they are."""

    def __init__(self, dataset: Location, files: list[str]):
        self._dataset, self._files = dataset, files
        self._stored: dict[Split, dict[str, str] | None] = {"holdout": self._read("holdout"), "train": None}
        self._added: dict[Split, dict[str, str]] = {"holdout": {}, "train": {}}

    def _read(self, split: Split) -> dict[str, str]:
        owners: dict[str, str] = {}
        for batch in iter_batches(self._dataset, self._files, DATASET_SCHEMA, ["id", "image_sha256"], split):
            for row_id, digest in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                owners.setdefault(digest, row_id)
        return owners

    def other(self, digest: str, split: Split) -> tuple[Split, str] | None:
        """``(the other split, row id)`` when the image ``digest`` is accepted there already, else None."""
        other: Split = "train" if split == "holdout" else "holdout"
        stored = self._stored[other]
        if stored is None:
            stored = self._stored[other] = self._read(other)
        row_id = stored.get(digest) or self._added[other].get(digest)
        return None if row_id is None else (other, row_id)

    def add(self, digest: str, row_id: str, split: Split) -> None:
        self._added[split].setdefault(digest, row_id)


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
    dataset: Where,
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

    ``dataset`` is a local folder or an ``s3://bucket/prefix`` URI (:mod:`storage.location`).
    Raises SourceError (one line naming the folder or file) when the source cannot be read at all;
    in that case the dataset is not created or changed. On S3, LeaseLost when the dataset's lease
    was lost mid-ingest (the rerun completes the ingest).
    """
    source, dataset = Path(source), Location.of(dataset)
    batch_id = batch_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    if not _BATCH_ID.match(batch_id):
        raise ValueError(f"batch_id {batch_id!r} must match {_BATCH_ID.pattern} (it names files)")
    workers = workers or os.cpu_count() or 1
    if workers < 1 or chunk_rows < 1:
        raise ValueError("workers and chunk_rows must be at least 1")
    source_name = str(source)
    now = datetime.now(timezone.utc)

    with open_source(source, cfg, batch_rows=chunk_rows) as stream:  # fails before the dataset is touched
        create(dataset)
        with locked(dataset) as still_held, _pool(cfg, workers) as check:
            if not dataset.remote:  # left by a crash; never visible (S3 has no temporary objects)
                for sub in (IMAGES_DIR, QUARANTINE_DIR, SNAPSHOTS_DIR):
                    for stale in Path(dataset.path(sub)).glob(f".*{TMP_SUFFIX}"):
                        stale.unlink(missing_ok=True)
            image_files = part_files(dataset, IMAGES_DIR)
            existing, held_out = _stored_ids(dataset, image_files)
            splits = _SplitOwners(dataset, image_files)
            quarantine = read_parts(dataset, part_files(dataset, QUARANTINE_DIR), QUARANTINE_SCHEMA, ["source", "key", "reason"])
            recorded = set(zip(*(quarantine.column(c).to_pylist() for c in ("source", "key", "reason"))))
            owner: dict[str, str] = {}  # image sha256 -> id of the accepted row; only for the reject policy
            if cfg.same_image_other_caption == "reject":
                for batch in iter_batches(dataset, image_files, DATASET_SCHEMA, ["id", "image_sha256"]):
                    for row_id, digest in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        owner.setdefault(digest, row_id)
            next_image, next_quarantine = _next_part(dataset, IMAGES_DIR, batch_id), _next_part(dataset, QUARANTINE_DIR, batch_id)
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
                    elif (clash := splits.other(result.image_sha256, item.split)) is not None:
                        reject(
                            item.key,
                            Reason.SPLIT_CONFLICT,
                            f"{item.key}: marked {item.split}, but the same image is already accepted as "
                            f"{clash[0]} (row id {clash[1]}); a photo is either trained on or held out, never both",
                        )
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
                        splits.add(result.image_sha256, result.id, item.split)
                        if item.split == "holdout":
                            held_out.add(result.id)
                        new_rows.append(result)
                still_held()
                if new_rows:
                    table = _image_table(new_rows, source_name, now, batch_id)
                    _write_table(dataset, table, dataset.path(IMAGES_DIR, f"part-{batch_id}-{next_image:05d}.parquet"))
                    next_image += 1
                    existing.update(r.id for r in new_rows)
                    accepted += len(new_rows)
                if new_rejects:
                    table = _quarantine_table(new_rejects, source_name, now, batch_id)
                    _write_table(dataset, table, dataset.path(QUARANTINE_DIR, f"part-{batch_id}-{next_quarantine:05d}.parquet"))
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
            snapshot = snapshot_of(list(existing), held_out)
            still_held()
            manifest = write_manifest(dataset, snapshot, len(existing), batch_id, len(held_out))

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
