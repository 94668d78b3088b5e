"""The Parquet image dataset: ingest an image folder + captions file, read it back.

Layout of a dataset (a directory)::

    dataset/images/part-<batch>-<n>.parquet       accepted rows, DATASET_SCHEMA
    dataset/quarantine/part-<batch>-<n>.parquet   rejected inputs, QUARANTINE_SCHEMA

Guarantees:

* **Nothing is silently dropped.** Every input row is accepted, found unchanged (already in the
  dataset), or written to the quarantine with a reason code from :class:`Reason` and a message.
* **Idempotent.** A row's id is a content hash of its image bytes and caption, so ingesting the same
  source twice writes no new image rows; quarantine rows are keyed by ``(source, key, reason)`` and are
  written once.
* **Atomic.** Each part file is written under a temporary name in the same directory, fsynced and moved
  into place with ``os.replace``; readers only look at ``part-*.parquet``, so a crash never exposes a
  partial file. A crashed ingest is finished by running it again.
* **Bounded memory.** The captions file is streamed and processed in chunks of ``chunk_rows`` rows; the
  images of one chunk are read and validated in a thread pool and written as one part file.

One ingest at a time holds an exclusive lock on ``dataset/.lock`` (POSIX ``flock``; released by the
OS if the process dies), so concurrent ingests into the same dataset are serialised, not interleaved.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pogdiff.config import IngestConfig

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
    "ingest_folder",
    "read_images",
    "read_quarantine",
    "snapshot_id",
]

DATASET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # sha256(image bytes + b"\0" + caption)[:32]
        pa.field("caption", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # the original encoded file bytes
        pa.field("format", pa.string(), nullable=False),  # PIL format name: PNG, JPEG, ...
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the source folder as given
        pa.field("key", pa.string(), nullable=False),  # image path relative to the source
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
_PART_GLOB = "part-*.parquet"
_TMP_SUFFIX = ".tmp"
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of invalid bytes


class SourceError(Exception):
    """The source as a whole cannot be read; the message is one line naming the file or folder."""


class Reason(StrEnum):
    """Why an input row was quarantined."""

    MALFORMED_ROW = "malformed_row"  # captions-file row unparsable or without an image field
    MISSING_FILE = "missing_file"
    PATH_OUTSIDE_SOURCE = "path_outside_source"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    FORMAT_NOT_ALLOWED = "format_not_allowed"
    TOO_SMALL = "too_small"
    TOO_MANY_PIXELS = "too_many_pixels"
    EMPTY_CAPTION = "empty_caption"
    INVALID_UTF8 = "invalid_utf8"
    CAPTION_TOO_LONG = "caption_too_long"
    DUPLICATE = "duplicate"
    SAME_IMAGE_OTHER_CAPTION = "same_image_other_caption"


class IngestReport(BaseModel):
    """What one ingest did. ``rejected`` counts this run's rejected rows by reason code (including
    rows already in the quarantine from an earlier run, which are not written again)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted: int  # new image rows written
    unchanged: int  # rows whose id was already in the dataset
    rejected: dict[str, int]
    snapshot_id: str  # snapshot_id(dataset) after the ingest
    total_rows: int  # image rows in the dataset after the ingest
    batch_id: str


# --------------------------------------------------------------------------------------------
# Reading the captions file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One captions-file row after text-level checks. ``reason`` set means already rejected."""

    key: str
    caption: str = ""
    metadata: str = "{}"
    reason: Reason | None = None
    message: str = ""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _printable(text: str) -> str:
    """Text that may hold escaped invalid bytes, made valid UTF-8 (bad bytes shown as \\xNN)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _has_bad_utf8(value: Any) -> bool:
    """True if any string in ``value`` (nested dicts/lists included) holds escaped invalid bytes."""
    if isinstance(value, str):
        return _BAD_UTF8.search(value) is not None
    if isinstance(value, dict):
        return any(_has_bad_utf8(k) or _has_bad_utf8(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_bad_utf8(v) for v in value)
    return False


def _make_row(
    key: Any, caption: Any, extra: dict[str, Any], where: str, cfg: IngestConfig
) -> _Row:
    """Text-level validation of one row: image field, UTF-8, caption."""
    if not isinstance(key, str) or not key:
        field = cfg.image_column
        what = "missing" if key is None else "empty" if key == "" else "not a string"
        return _Row(where, reason=Reason.MALFORMED_ROW, message=f"{where}: field '{field}' is {what}")
    if _has_bad_utf8([key, caption, extra]):
        shown = _printable(json.dumps([key, caption, extra], ensure_ascii=False))
        return _Row(
            _printable(key),
            reason=Reason.INVALID_UTF8,
            message=f"{where}: not valid UTF-8 (bad bytes as \\xNN): {_one_line(shown)[:200]}",
        )
    if caption is not None and not isinstance(caption, str):
        return _Row(
            key,
            reason=Reason.MALFORMED_ROW,
            message=f"{where}: field '{cfg.caption_column}' is {type(caption).__name__}, not text",
        )
    caption = (caption or "").strip()
    if not caption:
        return _Row(key, reason=Reason.EMPTY_CAPTION, message=f"{where}: caption is empty")
    if len(caption) > cfg.max_caption_chars:
        if cfg.caption_overflow == "reject":
            return _Row(
                key,
                reason=Reason.CAPTION_TOO_LONG,
                message=f"{where}: caption has {len(caption)} characters, "
                f"more than max_caption_chars={cfg.max_caption_chars}",
            )
        caption = caption[: cfg.max_caption_chars].rstrip()
    metadata = json.dumps(extra, ensure_ascii=False, sort_keys=True)
    return _Row(key, caption=caption, metadata=metadata)


def _open_captions(path: Path, cfg: IngestConfig) -> tuple[Iterator[_Row], BinaryIO]:
    """Check the captions file as a whole (raise SourceError); return a lazy row iterator and the
    open file, which the caller closes."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise SourceError(
            f"cannot read captions file {path}: unsupported extension '{path.suffix}' (use .csv or .jsonl)"
        )
    if not path.exists():
        raise SourceError(f"captions file not found: {path}")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as err:
        raise SourceError(f"cannot read captions file {path}: {_one_line(err.strerror or err)}") from None
    try:
        rows = _csv_rows(handle, path, cfg) if suffix == ".csv" else _jsonl_rows(handle, path, cfg)
    except BaseException:
        handle.close()
        raise
    return rows, handle


def _csv_rows(handle: BinaryIO, path: Path, cfg: IngestConfig) -> Iterator[_Row]:
    # Decode with surrogateescape instead of strictly: a row with invalid bytes is quarantined on its
    # own (its fields carry lone surrogates) instead of failing the file; quoted multi-line fields work.
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
    except (csv.Error, OSError) as err:
        raise SourceError(f"cannot read captions file {path}: {_one_line(err)}") from None
    if not header:
        raise SourceError(f"cannot read captions file {path}: no header row")
    for column in (cfg.image_column, cfg.caption_column):
        if column not in header:
            raise SourceError(f"cannot read captions file {path}: missing column '{column}'")
    image_at, caption_at = header.index(cfg.image_column), header.index(cfg.caption_column)
    extra_at = [(i, name) for i, name in enumerate(header) if i not in (image_at, caption_at)]

    def rows() -> Iterator[_Row]:
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, OSError) as err:
                raise SourceError(
                    f"cannot read captions file {path}: line {reader.line_num}: {_one_line(err)}"
                ) from None
            if not fields:  # blank line
                continue
            where = f"{path.name}:{reader.line_num}"
            if len(fields) > len(header):
                yield _Row(
                    where,
                    reason=Reason.MALFORMED_ROW,
                    message=f"{where}: {len(fields)} fields, header has {len(header)}",
                )
                continue
            values = fields + [None] * (len(header) - len(fields))  # short row: absent fields
            extra = {name: values[i] for i, name in extra_at}
            yield _make_row(values[image_at], values[caption_at], extra, where, cfg)

    return rows()


def _jsonl_rows(handle: BinaryIO, path: Path, cfg: IngestConfig) -> Iterator[_Row]:
    # Each line is decoded on its own, so one bad line is one quarantined row. The first object
    # decides whether the required fields exist at all (a wrong column name fails the whole file).
    def parse(lineno: int, raw: bytes) -> tuple[str, Any]:
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        text = raw.decode("utf-8", "surrogateescape")
        try:
            return text, json.loads(text)
        except ValueError as err:
            return text, err

    lines = ((n, raw) for n, raw in enumerate(handle, start=1) if raw.strip())
    head: list[tuple[int, bytes]] = []  # lines read while looking for the first object
    try:
        for n, raw in lines:
            _, obj = parse(n, raw)
            head.append((n, raw))
            if isinstance(obj, dict):
                for column in (cfg.image_column, cfg.caption_column):
                    if column not in obj:
                        raise SourceError(
                            f"cannot read captions file {path}: missing column '{column}' (line {n})"
                        )
                break
    except OSError as err:
        raise SourceError(f"cannot read captions file {path}: {_one_line(err)}") from None

    def rows() -> Iterator[_Row]:
        for n, raw in itertools.chain(head, lines):
            where = f"{path.name}:{n}"
            text, obj = parse(n, raw)
            if isinstance(obj, ValueError):
                reason = Reason.INVALID_UTF8 if _BAD_UTF8.search(text) else Reason.MALFORMED_ROW
                yield _Row(where, reason=reason, message=f"{where}: not valid JSON: {_one_line(obj)}")
                continue
            if not isinstance(obj, dict):
                yield _Row(
                    where,
                    reason=Reason.MALFORMED_ROW,
                    message=f"{where}: expected a JSON object, got {type(obj).__name__}",
                )
                continue
            if cfg.caption_column not in obj:
                yield _Row(
                    where,
                    reason=Reason.MALFORMED_ROW,
                    message=f"{where}: field '{cfg.caption_column}' is missing",
                )
                continue
            extra = {k: v for k, v in obj.items() if k not in (cfg.image_column, cfg.caption_column)}
            yield _make_row(obj.get(cfg.image_column), obj[cfg.caption_column], extra, where, cfg)

    return rows()


# --------------------------------------------------------------------------------------------
# Validating one image
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checked:
    """A row after the file-level checks. ``reason`` set means rejected."""

    row: _Row
    reason: Reason | None = None
    message: str = ""
    id: str = ""
    image_hash: str = ""  # sha256 of the image bytes alone
    image: bytes = b""
    format: str = ""
    width: int = 0
    height: int = 0


_SEPARATORS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def _unsafe_key(key: str) -> bool:
    """Absolute paths and ``..`` components (either separator, so a key means the same everywhere)."""
    if key.startswith(("/", "\\")) or _DRIVE.match(key) or PurePath(key).is_absolute():
        return True
    return ".." in _SEPARATORS.split(key)


def _check_image(row: _Row, source: Path, root: Path, cfg: IngestConfig) -> _Checked:
    """Resolve, read and validate one image; runs in a worker thread."""
    key = row.key

    def reject(reason: Reason, message: str) -> _Checked:
        return _Checked(row, reason, f"{_printable(key)}: {message}")

    if _unsafe_key(key):
        return reject(Reason.PATH_OUTSIDE_SOURCE, "absolute path or '..' in the image path")
    try:
        real = Path(os.path.realpath(source / key))
        if not real.is_relative_to(root):
            return reject(Reason.PATH_OUTSIDE_SOURCE, "symlink resolves outside the source folder")
        if not real.is_file():
            return reject(Reason.MISSING_FILE, "not a regular file" if real.exists() else "no such file")
    except (OSError, ValueError) as err:  # e.g. a NUL character or an over-long name in the path
        return reject(Reason.MISSING_FILE, f"not a usable path ({_one_line(err)})")
    try:
        with open(real, "rb") as handle:
            try:
                im = Image.open(handle)
            except Image.DecompressionBombError as err:  # only if another caller re-armed PIL's limit
                return reject(Reason.TOO_MANY_PIXELS, _one_line(err))
            except Exception as err:  # noqa: BLE001 - any failure to identify is "not an image"
                return reject(Reason.NOT_AN_IMAGE, f"not a recognised image ({_one_line(err)})")
            with im:
                fmt, (width, height) = im.format or "", im.size
                if fmt not in cfg.allowed_formats:
                    return reject(
                        Reason.FORMAT_NOT_ALLOWED,
                        f"format {fmt or 'unknown'} is not in allowed_formats {list(cfg.allowed_formats)}",
                    )
                # From the header, before anything is decoded: a decompression bomb never gets allocated.
                if width * height > cfg.max_pixels:
                    return reject(
                        Reason.TOO_MANY_PIXELS,
                        f"{width}x{height} = {width * height} pixels, more than max_pixels={cfg.max_pixels}",
                    )
                if min(width, height) < cfg.min_side:
                    return reject(
                        Reason.TOO_SMALL, f"{width}x{height}, a side is smaller than min_side={cfg.min_side}"
                    )
                try:
                    im.load()
                except Exception as err:  # noqa: BLE001 - any decode failure means damaged data
                    return reject(Reason.TRUNCATED, f"cannot decode the image data ({_one_line(err)})")
            handle.seek(0)
            data = handle.read()
    except OSError as err:
        return reject(Reason.MISSING_FILE, f"cannot read the file ({_one_line(err.strerror or err)})")
    digest = hashlib.sha256(data)
    image_hash = digest.hexdigest()
    digest.update(b"\0" + row.caption.encode("utf-8"))
    return _Checked(
        row,
        id=digest.hexdigest()[:32],
        image_hash=image_hash,
        image=data,
        format=fmt,
        width=width,
        height=height,
    )


_PIL_LOCK = threading.Lock()
_PIL_USERS = 0
_PIL_SAVED: int | None = None


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Switch off PIL's decompression-bomb check while ingests run: ``max_pixels`` is checked from the
    header first, and PIL's own limit (warning above MAX_IMAGE_PIXELS, error above twice that) would
    otherwise pre-empt it with a different outcome. Restored when the last running ingest ends."""
    global _PIL_USERS, _PIL_SAVED
    with _PIL_LOCK:
        if _PIL_USERS == 0:
            _PIL_SAVED = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _PIL_USERS += 1
    try:
        yield
    finally:
        with _PIL_LOCK:
            _PIL_USERS -= 1
            if _PIL_USERS == 0:
                Image.MAX_IMAGE_PIXELS = _PIL_SAVED


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened for fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(table: pa.Table, final: Path) -> None:
    """Write ``table`` to ``final`` so that the name only ever shows a complete file."""
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


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


def read_images(dataset: Path, columns: list[str] | None = None) -> pa.Table:
    """All accepted image rows (DATASET_SCHEMA, or ``columns`` of it), sorted by id."""
    files = _parts(dataset, IMAGES_DIR)
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
    ids = _read(_parts(dataset, IMAGES_DIR), DATASET_SCHEMA, ["id"]).column("id")
    return _snapshot_of(ids.to_pylist())


def _snapshot_of(ids: list[str]) -> str:
    if not ids:
        return "empty"
    digest = hashlib.sha256()
    for row_id in sorted(ids):
        digest.update(row_id.encode("ascii") + b"\n")
    return digest.hexdigest()[:16]


def caption_counts(dataset: Path) -> dict[str, int]:
    """Training images per caption, keys in sorted order."""
    captions = _read(_parts(dataset, IMAGES_DIR), DATASET_SCHEMA, ["caption"]).column("caption")
    if len(captions) == 0:
        return {}
    counts = pc.value_counts(captions).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def check_source(source: Path, cfg: IngestConfig) -> None:
    """Raise SourceError (one line naming the folder or file) if ``source`` cannot be ingested at all.

    Used before a flow starts, so a bad path is reported as one line rather than a failed run.
    """
    source = Path(source)
    if not source.exists():
        raise SourceError(f"source folder not found: {source}")
    if not source.is_dir():
        raise SourceError(f"source is not a folder: {source}")
    rows, handle = _open_captions(source / cfg.captions_file, cfg)
    try:
        next(iter(rows), None)  # the header (and first row) must parse
    finally:
        handle.close()


def ingest_folder(
    source: Path,
    dataset: Path,
    cfg: IngestConfig,
    batch_id: str | None = None,
    workers: int | None = None,
    *,
    chunk_rows: int = 512,
) -> IngestReport:
    """Ingest ``source`` (an image folder with ``cfg.captions_file``) into the Parquet ``dataset``.

    Each captions-file row is accepted (written to ``dataset/images``), found unchanged (its id is
    already there) or quarantined with a :class:`Reason` (``dataset/quarantine``). Rows are processed
    ``chunk_rows`` at a time; images are read and validated by ``workers`` threads (default: CPU
    count); each chunk writes at most one image part and one quarantine part, atomically.

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
    check_source(source, cfg)
    rows, captions = _open_captions(source / cfg.captions_file, cfg)  # fails before the dataset is touched
    source_name, root = str(source), Path(os.path.realpath(source))
    now = datetime.now(timezone.utc)
    images_dir, quarantine_dir = dataset / IMAGES_DIR, dataset / QUARANTINE_DIR

    try:
        for directory in (images_dir, quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        with _locked(dataset), _own_pixel_limit(), ThreadPoolExecutor(workers) as pool:
            for directory in (images_dir, quarantine_dir):  # left by a crashed ingest; never visible
                for stale in directory.glob(f".part-*{_TMP_SUFFIX}"):
                    stale.unlink(missing_ok=True)
            image_files = _parts(dataset, IMAGES_DIR)
            existing = set(_read(image_files, DATASET_SCHEMA, ["id"]).column("id").to_pylist())
            quarantine = _read(_parts(dataset, QUARANTINE_DIR), QUARANTINE_SCHEMA, ["source", "key", "reason"])
            recorded = set(zip(*(quarantine.column(c).to_pylist() for c in ("source", "key", "reason"))))
            owner: dict[str, str] = {}  # image hash -> id of the accepted row; only for the reject policy
            if cfg.same_image_other_caption == "reject":
                for batch in _batches(image_files, DATASET_SCHEMA, ["id", "image"]):
                    for row_id, image in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        owner.setdefault(hashlib.sha256(image).hexdigest(), row_id)
            next_image, next_quarantine = _next_part(images_dir, batch_id), _next_part(quarantine_dir, batch_id)
            seen: dict[str, str] = {}  # id -> key of the row that was ingested (or found unchanged)
            accepted = unchanged = 0
            rejected: Counter[str] = Counter()

            while chunk := list(itertools.islice(rows, chunk_rows)):
                new_rows: list[_Checked] = []
                new_rejects: list[tuple[str, str, str]] = []

                def reject(key: str, reason: Reason, message: str) -> None:
                    rejected[reason.value] += 1
                    if (source_name, key, reason.value) not in recorded:
                        recorded.add((source_name, key, reason.value))
                        new_rejects.append((key, reason.value, message))

                to_check = [row for row in chunk if row.reason is None]
                checked = iter(pool.map(lambda r: _check_image(r, source, root, cfg), to_check))
                for row in chunk:
                    if row.reason is not None:
                        reject(row.key, row.reason, row.message)
                        continue
                    item = next(checked)
                    if item.reason is not None:
                        reject(row.key, item.reason, item.message)
                    elif item.id in seen:
                        reject(row.key, Reason.DUPLICATE, f"{row.key}: same image and caption as '{seen[item.id]}'")
                    elif item.id in existing:
                        seen[item.id] = row.key
                        unchanged += 1
                    elif cfg.same_image_other_caption == "reject" and item.image_hash in owner:
                        reject(
                            row.key,
                            Reason.SAME_IMAGE_OTHER_CAPTION,
                            f"{row.key}: the same image is already accepted with another caption "
                            f"(row id {owner[item.image_hash]})",
                        )
                    else:
                        seen[item.id] = row.key
                        owner.setdefault(item.image_hash, item.id)
                        new_rows.append(item)

                if new_rows:
                    table = pa.table(
                        {
                            "id": [r.id for r in new_rows],
                            "caption": [r.row.caption for r in new_rows],
                            "image": [r.image for r in new_rows],
                            "format": [r.format for r in new_rows],
                            "width": [r.width for r in new_rows],
                            "height": [r.height for r in new_rows],
                            "source": [source_name] * len(new_rows),
                            "key": [r.row.key for r in new_rows],
                            "metadata": [r.row.metadata for r in new_rows],
                            "ingested_at": [now] * len(new_rows),
                            "batch_id": [batch_id] * len(new_rows),
                        },
                        schema=DATASET_SCHEMA,
                    )
                    _write_atomic(table, images_dir / f"part-{batch_id}-{next_image:05d}.parquet")
                    next_image += 1
                    existing.update(r.id for r in new_rows)
                    accepted += len(new_rows)
                if new_rejects:
                    keys, reasons, messages = (list(col) for col in zip(*new_rejects))
                    table = pa.table(
                        {
                            "source": [source_name] * len(keys),
                            "key": keys,
                            "reason": reasons,
                            "message": messages,
                            "batch_id": [batch_id] * len(keys),
                            "recorded_at": [now] * len(keys),
                        },
                        schema=QUARANTINE_SCHEMA,
                    )
                    _write_atomic(table, quarantine_dir / f"part-{batch_id}-{next_quarantine:05d}.parquet")
                    next_quarantine += 1
    finally:
        captions.close()

    return IngestReport(
        accepted=accepted,
        unchanged=unchanged,
        rejected=dict(sorted(rejected.items())),
        snapshot_id=_snapshot_of(list(existing)),
        total_rows=len(existing),
        batch_id=batch_id,
    )
