"""Detecting and opening caption–image sources as a stream of inputs.

Three kinds of source, detected from what is on disk (``IngestConfig.source_kind`` overrides):

* ``folder``: a folder holding ``cfg.captions_file`` (.csv or .jsonl) whose rows name an image path
  relative to the folder and a caption; the other columns are kept as metadata.
* ``parquet``: a ``.parquet`` file or a folder of them (searched recursively), the Hugging Face
  datasets export shape: ``cfg.image_column`` is a struct ``{bytes, path}``, plain binary (the
  encoded file) or a string path relative to the source folder; ``cfg.caption_column`` is text.
  Other non-binary columns are kept as metadata.
* ``webdataset``: a ``.tar`` shard or a folder of them; a sample is the run of adjacent members
  sharing a key (``dir/key.jpg`` + ``dir/key.txt`` or ``dir/key.json``), read with the standard
  library's streaming tar reader, so a shard is never unpacked or held in memory.

Every reader (:mod:`storage.readers`) yields :class:`~storage.items.Item` values one at a time
(bounded memory). An item either carries a :class:`~storage.items.Reason` already (rejected on text
or path grounds, :mod:`storage.items`) or the image to check: a path to read (folder rows, Parquet
path rows) or the bytes (Parquet bytes, tar members). Image checks run in the worker pool
(:mod:`storage.validate`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from storage.config import IngestConfig
from storage.items import Item, Reason, SourceError, one_line, printable
from storage.readers import captions_path, folder_items, image_mode, parquet_file, parquet_items, tar_items

__all__ = ["Stream", "check_source", "detect_kind", "open_source"]

Kind = Literal["folder", "parquet", "webdataset"]


@dataclass
class Stream:
    """An open source: ``items`` is lazy; ``total`` is the input count when known up front."""

    kind: Kind
    items: Iterator[Item]
    total: int | None


def _files(source: Path, suffix: str) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob(f"*{suffix}") if p.is_file() and not p.name.startswith("."))


def _outside(files: list[Path], source: Path) -> tuple[list[Path], list[Item]]:
    """``files`` split into those inside ``source`` and a rejection for each one that is a symlink
    resolving outside it (a shard is never followed out of the source, like an image path)."""
    if source.is_file():
        return files, []
    root = Path(os.path.realpath(source))
    inside, rejected = [], []
    for path in files:
        real = Path(os.path.realpath(path))
        if real.is_relative_to(root):
            inside.append(path)
        else:
            rel = path.relative_to(source).as_posix()
            rejected.append(Item(printable(rel), reason=Reason.PATH_OUTSIDE_SOURCE,
                                 message=f"{printable(rel)}: shard is a symlink resolving outside the source folder"))
    return inside, rejected


def detect_kind(source: Path, cfg: IngestConfig) -> Kind:
    """The source's kind: ``cfg.source_kind`` unless ``auto``, else from the file or folder contents
    (a captions file wins, then ``*.parquet``, then ``*.tar``). Raises SourceError if none fits."""
    source = Path(source)
    if not source.exists():
        raise SourceError(f"source folder not found: {source}")
    if cfg.source_kind != "auto":
        return cfg.source_kind
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".parquet":
            return "parquet"
        if suffix == ".tar":
            return "webdataset"
        raise SourceError(f"source file {source} is neither .parquet nor .tar (a folder source is given as the folder)")
    if (source / cfg.captions_file).exists():
        return "folder"
    if _files(source, ".parquet"):
        return "parquet"
    if _files(source, ".tar"):
        return "webdataset"
    raise SourceError(f"captions file not found: {source / cfg.captions_file} (and no *.parquet or *.tar files in {source}){_captions_hint(source, cfg)}")


def _captions_hint(source: Path, cfg: IngestConfig) -> str:
    """What to do about a missing captions file: name another one that is there, else the setting."""
    others = sorted(p.name for p in source.glob("*") if p.suffix.lower() in (".csv", ".jsonl") and p.name != cfg.captions_file) \
        if source.is_dir() else []
    if others:
        return f"; found {others[0]}: set ingest.captions_file: {others[0]} in the config"
    return "; a folder source needs a captions file (.csv or .jsonl, named by ingest.captions_file)"


@contextmanager
def open_source(source: Path, cfg: IngestConfig, batch_rows: int = 256) -> Iterator[Stream]:
    """Open ``source`` for one pass; raises SourceError (one line naming the file or folder) if it
    cannot be read at all, before any item is produced."""
    source = Path(source)
    kind = detect_kind(source, cfg)
    root = source.parent if source.is_file() else source
    if kind == "folder":
        if not source.is_dir():
            raise SourceError(f"source is not a folder: {source}")
        path = captions_path(source, cfg)
        if not path.exists():
            raise SourceError(f"captions file not found: {path}{_captions_hint(source, cfg)}")
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as err:
            raise SourceError(f"cannot read captions file {path}: {one_line(err.strerror or err)}") from None
        try:
            yield Stream(kind, folder_items(source, cfg, handle), None)
        finally:
            handle.close()
        return
    if kind == "parquet":
        files, outside = _outside(_files(source, ".parquet"), source)
        if not files and not outside:
            raise SourceError(f"no .parquet files in {source}")
        total = 0
        for path in files:  # footers only: checks every file's columns before anything is ingested
            pf = parquet_file(path)
            image_mode(pf.schema_arrow, path, cfg)
            total += pf.metadata.num_rows
        yield Stream(kind, itertools.chain(outside, parquet_items(files, root, cfg, batch_rows)), total + len(outside))
        return
    shards, outside = _outside(_files(source, ".tar"), source)
    if not shards and not outside:
        raise SourceError(f"no .tar shards in {source}")
    yield Stream(kind, itertools.chain(outside, tar_items(shards, root, cfg)), None)


def check_source(source: Path, cfg: IngestConfig) -> None:
    """Raise SourceError (one line naming the folder or file) if ``source`` cannot be ingested at all.

    Used before a flow starts, so a bad path is reported as one line rather than a failed run.
    """
    with open_source(Path(source), cfg) as stream:
        next(stream.items, None)  # the header (and first input) must parse
