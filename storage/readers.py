"""The source readers, one per format: each yields :class:`~storage.items.Item` values one at a
time (bounded memory), with the text-level checks of :mod:`storage.items` applied.

* ``folder``: a captions file (.csv or .jsonl) whose rows name an image path relative to the folder.
* ``parquet``: Parquet files, the image as a struct ``{bytes, path}``, binary or a path string.
* ``webdataset``: ``.tar`` shards read with the standard library's streaming tar reader.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from storage.config import IngestConfig
from storage.items import BAD_UTF8, Item, Reason, SourceError, one_line, path_item, printable, text_item, unsafe_key

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["IMAGE_EXTENSIONS", "captions_path", "folder_items", "image_mode", "parquet_file", "parquet_items", "tar_items"]

# WebDataset's key/extension split: the key is everything up to the first dot of the base name.
_TAR_NAME = re.compile(r"^((?:.*/|)[^./]+)(?:\.([^/]*))?$")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm"})
_EXTRA_MEMBER_TEXT = 4096  # bytes of an extra tar member kept as metadata text


# --------------------------------------------------------------------------------------------
# (a) folder + captions file
# --------------------------------------------------------------------------------------------


def captions_path(source: Path, cfg: IngestConfig) -> Path:
    path = source / cfg.captions_file
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise SourceError(
            f"cannot read captions file {path}: unsupported extension '{path.suffix}' (use .csv or .jsonl)"
        )
    return path


def folder_items(source: Path, cfg: IngestConfig, handle: BinaryIO) -> Iterator[Item]:
    path = captions_path(source, cfg)
    root = Path(os.path.realpath(source))
    rows = _csv_rows(handle, path, cfg) if path.suffix.lower() == ".csv" else _jsonl_rows(handle, path, cfg)

    def items() -> Iterator[Item]:
        for row in rows:
            if isinstance(row, Item):
                yield row
                continue
            rel, caption, extra, where = row
            key = rel if isinstance(rel, str) and rel else where
            yield path_item(key, rel, caption, extra, where, root, cfg)

    return items()


_Row = tuple[Any, Any, dict[str, Any], str]  # image field, caption field, extra fields, "file:line"


def _csv_rows(handle: BinaryIO, path: Path, cfg: IngestConfig) -> Iterator[_Row | Item]:
    # Decode with surrogateescape instead of strictly: a row with invalid bytes is quarantined on its
    # own (its fields carry lone surrogates) instead of failing the file; quoted multi-line fields work.
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
    except (csv.Error, OSError) as err:
        raise SourceError(f"cannot read captions file {path}: {one_line(err)}") from None
    if not header:
        raise SourceError(f"cannot read captions file {path}: no header row")
    for column in (cfg.image_column, cfg.caption_column):
        if column not in header:
            raise SourceError(f"cannot read captions file {path}: missing column '{column}'")
    image_at, caption_at = header.index(cfg.image_column), header.index(cfg.caption_column)
    extra_at = [(i, name) for i, name in enumerate(header) if i not in (image_at, caption_at)]

    def rows() -> Iterator[_Row | Item]:
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, OSError) as err:
                raise SourceError(f"cannot read captions file {path}: line {reader.line_num}: {one_line(err)}") from None
            if not fields:  # blank line
                continue
            where = f"{path.name}:{reader.line_num}"
            if len(fields) > len(header):
                yield Item(where, reason=Reason.MALFORMED_ROW, message=f"{where}: {len(fields)} fields, header has {len(header)}")
                continue
            values = fields + [None] * (len(header) - len(fields))  # short row: absent fields
            yield values[image_at], values[caption_at], {name: values[i] for i, name in extra_at}, where

    return rows()


def _jsonl_rows(handle: BinaryIO, path: Path, cfg: IngestConfig) -> Iterator[_Row | Item]:
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
                        raise SourceError(f"cannot read captions file {path}: missing column '{column}' (line {n})")
                break
    except OSError as err:
        raise SourceError(f"cannot read captions file {path}: {one_line(err)}") from None

    def rows() -> Iterator[_Row | Item]:
        for n, raw in itertools.chain(head, lines):
            where = f"{path.name}:{n}"
            text, obj = parse(n, raw)
            if isinstance(obj, ValueError):
                reason = Reason.INVALID_UTF8 if BAD_UTF8.search(text) else Reason.MALFORMED_ROW
                yield Item(where, reason=reason, message=f"{where}: not valid JSON: {one_line(obj)}")
            elif not isinstance(obj, dict):
                yield Item(where, reason=Reason.MALFORMED_ROW, message=f"{where}: expected a JSON object, got {type(obj).__name__}")
            elif cfg.caption_column not in obj:
                yield Item(where, reason=Reason.MALFORMED_ROW, message=f"{where}: field '{cfg.caption_column}' is missing")
            else:
                extra = {k: v for k, v in obj.items() if k not in (cfg.image_column, cfg.caption_column)}
                yield obj.get(cfg.image_column), obj[cfg.caption_column], extra, where

    return rows()


# --------------------------------------------------------------------------------------------
# (b) Parquet with image bytes
# --------------------------------------------------------------------------------------------


# pyarrow is imported where it is used: only a Parquet source needs it (the spawned ingest workers
# import storage.items, not this module, so they skip pyarrow and start about 0.4 s sooner).


def image_mode(schema: pa.Schema, path: Path, cfg: IngestConfig) -> Literal["struct", "bytes", "path"]:
    import pyarrow as pa

    for column in (cfg.image_column, cfg.caption_column):
        if column not in schema.names:
            raise SourceError(f"cannot read Parquet file {path}: missing column '{column}'")
    kind = schema.field(cfg.image_column).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    raise SourceError(
        f"cannot read Parquet file {path}: column '{cfg.image_column}' has type {kind}; "
        "expected binary, a path string or struct<bytes, path>"
    )


def parquet_file(path: Path) -> pq.ParquetFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot read Parquet file {path}: {one_line(err)}") from None


def parquet_items(files: list[Path], root: Path, cfg: IngestConfig, batch_rows: int) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.compute as pc

    real_root = Path(os.path.realpath(root))
    for path in files:
        pf = parquet_file(path)
        schema = pf.schema_arrow
        mode = image_mode(schema, path, cfg)
        # Binary extra columns (thumbnails, embeddings) are not metadata; everything else is.
        extras = [
            f.name
            for f in schema
            if f.name not in (cfg.image_column, cfg.caption_column)
            and not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))
        ]
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=[cfg.image_column, cfg.caption_column, *extras]):
                # Captions via binary, so invalid UTF-8 in one row is that row's reason, not a failed batch.
                captions = batch.column(cfg.caption_column)
                if pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type):
                    captions = captions.cast(pa.large_binary())
                image = batch.column(cfg.image_column)
                if mode == "struct":  # struct_field, unlike .field(), honours null structs
                    data = pc.struct_field(image, "bytes").to_pylist()
                    has_path = image.type.get_field_index("path") >= 0
                    paths = pc.struct_field(image, "path").to_pylist() if has_path else [None] * len(data)
                else:
                    data = image.to_pylist() if mode == "bytes" else [None] * len(batch)
                    paths = image.to_pylist() if mode == "path" else [None] * len(batch)
                extra_rows = batch.select(extras).to_pylist() if extras else [{}] * len(batch)
                for blob, rel_path, caption, extra in zip(data, paths, captions.to_pylist(), extra_rows):
                    key, where = f"{rel}:{row}", f"{rel} row {row}"
                    row += 1
                    if caption is not None and not isinstance(caption, str):
                        caption = caption.decode("utf-8", "surrogateescape")
                    if blob is not None:
                        yield text_item(key, caption, extra, where, cfg, data=blob)
                    elif rel_path:
                        yield path_item(key, rel_path, caption, extra, where, real_root, cfg)
                    else:
                        yield Item(key, reason=Reason.MALFORMED_ROW, message=f"{where}: no image bytes and no path")
        except (OSError, pa.ArrowException) as err:
            # A damaged file: what was read stays; the rest is one quarantined input, not a lost one.
            yield Item(f"{rel}:{row}-", reason=Reason.MALFORMED_ROW, message=f"{rel}: unreadable from row {row}: {one_line(err)}")


# --------------------------------------------------------------------------------------------
# (c) WebDataset .tar shards
# --------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    key: str
    images: list[tuple[str, bytes]]
    members: dict[str, bytes]  # extension -> content, the non-image members
    reason: Reason | None = None
    message: str = ""

    def reject(self, reason: Reason, message: str) -> None:
        if self.reason is None:  # the first problem found is the one reported
            self.reason, self.message = reason, message


def _sample_item(sample: _Sample, shard: str, cfg: IngestConfig) -> Item:
    key, where = f"{shard}:{sample.key}", f"{shard}: sample '{sample.key}'"
    if sample.reason is not None:
        return Item(printable(key), reason=sample.reason, message=f"{where}: {sample.message}")
    if not sample.images:
        found = ", ".join(sorted(sample.members)) or "nothing"
        return Item(printable(key), reason=Reason.MISSING_FILE, message=f"{where}: no image member (has {found})")
    if len(sample.images) > 1:
        names = ", ".join(ext for ext, _ in sample.images)
        return Item(printable(key), reason=Reason.MALFORMED_ROW, message=f"{where}: more than one image member ({names})")
    extra: dict[str, Any] = {}
    caption: Any = None
    if "json" in sample.members:
        text = sample.members.pop("json").decode("utf-8", "surrogateescape")
        try:
            obj = json.loads(text)
        except ValueError as err:
            reason = Reason.INVALID_UTF8 if BAD_UTF8.search(text) else Reason.MALFORMED_ROW
            return Item(printable(key), reason=reason, message=f"{where}: .json member is not valid JSON: {one_line(err)}")
        if not isinstance(obj, dict):
            return Item(key, reason=Reason.MALFORMED_ROW, message=f"{where}: .json member is not a JSON object")
        caption = obj.pop(cfg.caption_column, None)
        extra.update(obj)
    if "txt" in sample.members:
        caption = sample.members.pop("txt").decode("utf-8", "surrogateescape")
    if caption is None:
        return Item(key, reason=Reason.MALFORMED_ROW, message=f"{where}: no .txt member and no '{cfg.caption_column}' in .json")
    for ext, content in sample.members.items():
        extra[ext] = (
            content.decode("utf-8", "surrogateescape")
            if len(content) <= _EXTRA_MEMBER_TEXT
            else f"<{len(content)} bytes>"
        )
    return text_item(key, caption, extra, where, cfg, data=sample.images[0][1])


def tar_items(shards: list[Path], root: Path, cfg: IngestConfig) -> Iterator[Item]:
    for shard in shards:
        rel = shard.relative_to(root).as_posix() if shard.is_relative_to(root) else shard.name
        try:
            tar = tarfile.open(shard, mode="r|*")  # streaming: members in order, never seeks back
        except (OSError, tarfile.TarError) as err:
            yield Item(rel, reason=Reason.MALFORMED_ROW, message=f"{rel}: not a readable tar shard ({one_line(err)})")
            continue
        sample: _Sample | None = None
        last = "the start"
        with tar:
            try:
                for member in tar:
                    if member.isdir():
                        continue
                    match = _TAR_NAME.match(member.name)
                    key, ext = (match.group(1), (match.group(2) or "").lower()) if match else (member.name, "")
                    if sample is None or key != sample.key:
                        if sample is not None:
                            yield _sample_item(sample, rel, cfg)
                        sample = _Sample(key, [], {})
                    last = member.name
                    if unsafe_key(member.name):
                        sample.reject(Reason.PATH_OUTSIDE_SOURCE, f"member '{member.name}' is an absolute path or has '..'")
                    elif member.issym() or member.islnk():
                        sample.reject(
                            Reason.PATH_OUTSIDE_SOURCE,
                            f"member '{member.name}' is a link to '{member.linkname}' (links are not followed)",
                        )
                    elif not member.isfile():
                        sample.reject(Reason.MISSING_FILE, f"member '{member.name}' is not a regular file")
                    elif member.size > (cap := cfg.max_image_bytes if ext in IMAGE_EXTENSIONS else cfg.max_member_bytes):
                        # skipped, not read: the streaming reader discards it in small blocks (a gzip bomb stays one)
                        sample.reject(Reason.TOO_LARGE, f"member '{member.name}' has {member.size} bytes, more than {cap}")
                    else:
                        handle = tar.extractfile(member)
                        content = handle.read() if handle is not None else b""
                        if ext in IMAGE_EXTENSIONS:
                            sample.images.append((ext, content))
                        else:
                            sample.members[ext] = content
            except (OSError, tarfile.TarError, EOFError) as err:
                if sample is not None:
                    sample.reject(Reason.MALFORMED_ROW, f"shard unreadable after member '{last}' ({one_line(err)})")
                else:
                    yield Item(rel, reason=Reason.MALFORMED_ROW, message=f"{rel}: unreadable after {last} ({one_line(err)})")
        if sample is not None:
            yield _sample_item(sample, rel, cfg)
