"""The caption graph's faiss index, stored next to the LanceDB tables, so that the next index run
updates it (``pogdiff.ann_graph.update``) instead of building it anew, and so that workers of a
sharded query (``tasks/graph_query.py``) read it themselves.

One file, ``<lancedb_uri>/_pogdiff_ann/captions.faiss``: a magic line, then a JSON header (what the
index was built for, the captions its lists were trained for, a generation id new at every write),
the caption id of each vector id (newline-separated; "" where removed) and the index in faiss' own
format, streamed (a copy in memory and a zip container made writing 1e5 vectors 5x slower). Each of
the first two is preceded by its length (8 bytes, little-endian). A local file is written under a
temporary name and renamed (``pogdiff.atomic``); behind a URI (``s3://…``) it is one object put
whole. Either way a reader sees the previous index or the new one, never a part. Whether it belongs
to the stored graph is checked before use (``ann_graph.update_blocker``): an index left by a run that
failed between its two writes is rebuilt, not trusted.
"""

from __future__ import annotations

import json
import struct
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from pogdiff import knn
from pogdiff.ann_graph import AnnIndex
from pogdiff.atomic import write_atomic
from pogdiff.config import IndexConfig
from storage.links import has_scheme

FOLDER = "_pogdiff_ann"  # not a LanceDB table: LanceDB lists only folders ending in .lance
FILE = "captions.faiss"
MAGIC = b"pogdiff caption index 1\n"


def location(lancedb_uri: str) -> str:
    """Where the index of the captions table in ``lancedb_uri`` is stored."""
    return f"{lancedb_uri.rstrip('/')}/{FOLDER}/{FILE}"


def _write_block(handle: BinaryIO, data: bytes) -> None:
    handle.write(struct.pack("<Q", len(data)))
    handle.write(data)


def _read_block(handle: BinaryIO) -> bytes:
    size = struct.unpack("<Q", handle.read(8))[0]
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("truncated")
    return data


def write_ann_index(lancedb_uri: str, ann: AnnIndex) -> str:
    """Store ``ann`` for the captions table in ``lancedb_uri``, replacing the stored one; returns its generation."""
    generation = uuid.uuid4().hex
    header = {"key": ann.key, "trained_on": ann.trained_on, "generation": generation}

    def write(handle: BinaryIO) -> None:
        handle.write(MAGIC)
        _write_block(handle, json.dumps(header).encode("utf-8"))
        _write_block(handle, "\n".join(ann.slots).encode("utf-8"))
        knn.write_index(ann.index, handle)

    path = location(lancedb_uri)
    if has_scheme(path):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(inner) as out:  # an object store makes the object visible whole, at close
            write(out)
    else:
        write_atomic(path, write)
    return generation


@contextmanager
def _opened(path: str) -> Iterator[BinaryIO | None]:
    """``path`` (a local file or a URI pyarrow's filesystems read) open for reading; None when it does not exist."""
    try:
        if has_scheme(path):
            from pyarrow import fs

            filesystem, inner = fs.FileSystem.from_uri(path)
            handle = filesystem.open_input_stream(inner)
        else:
            handle = open(path, "rb")
    except FileNotFoundError:
        yield None
        return
    with handle:
        yield handle


def read_ann_index(lancedb_uri: str, cfg: IndexConfig, load_index: bool = True) -> tuple[AnnIndex, str] | None:
    """The stored index (searched with ``cfg``'s nprobe) and its generation; None when none is stored.
    ``load_index=False`` reads what it holds without the index itself (``index`` None), which is small."""
    path = location(lancedb_uri)
    with _opened(path) as handle:
        if handle is None:
            return None
        try:
            if handle.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a pogdiff caption index of this version")
            header = json.loads(_read_block(handle))
            slots = _read_block(handle).decode("utf-8").split("\n")
            index = knn.read_index(handle, cfg) if load_index else None
        except (ValueError, KeyError, OSError, RuntimeError, struct.error) as err:
            raise ValueError(f"stored caption index {path} cannot be read ({err}); delete it and the next index run "
                             "rebuilds it") from None
    return AnnIndex(index, slots, header["key"], int(header["trained_on"])), header["generation"]
