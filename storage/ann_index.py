"""The caption graph's faiss index, stored next to the LanceDB tables, so that the next index run
updates it (``pogdiff.ann_graph.update``) instead of building it anew, and so that workers of a
sharded query (``tasks/graph_query.py``) read it themselves.

One file, ``<lancedb_uri>/_pogdiff_ann/captions.npz``, members (all ``uint8``): ``index`` (faiss'
own format), ``slots`` (the caption id of each vector id, newline-separated; "" where removed) and
``header`` (JSON: what the index was built for, the captions its lists were trained for, and a
generation id new at every write). A local file is written under a temporary name and renamed
(``pogdiff.atomic``); behind a URI (``s3://…``) it is one object put whole. Either way a reader sees
the previous index or the new one, never a part. Whether it belongs to the stored graph is checked
before use (``ann_graph.update_blocker``): an index left by a run that failed between its two writes
is rebuilt, not trusted.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile

import numpy as np

from pogdiff import knn
from pogdiff.ann_graph import AnnIndex
from pogdiff.atomic import write_atomic
from pogdiff.config import IndexConfig
from storage.links import has_scheme

FOLDER = "_pogdiff_ann"  # not a LanceDB table: LanceDB lists only folders ending in .lance
FILE = "captions.npz"
FORMAT = 1


def location(lancedb_uri: str) -> str:
    """Where the index of the captions table in ``lancedb_uri`` is stored."""
    return f"{lancedb_uri.rstrip('/')}/{FOLDER}/{FILE}"


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def write_ann_index(lancedb_uri: str, ann: AnnIndex) -> str:
    """Store ``ann`` for the captions table in ``lancedb_uri``, replacing the stored one; returns its generation."""
    generation = uuid.uuid4().hex
    header = {"format": FORMAT, "key": ann.key, "trained_on": ann.trained_on, "generation": generation}
    members = {"header": _bytes(json.dumps(header)), "slots": _bytes("\n".join(ann.slots)), "index": knn.to_bytes(ann.index)}
    path = location(lancedb_uri)
    if has_scheme(path):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        buffer = io.BytesIO()  # an object store takes the object whole: np.savez needs a seekable file
        np.savez(buffer, **members)
        filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(inner) as out:
            out.write(buffer.getbuffer())
    else:
        write_atomic(path, lambda handle: np.savez(handle, **members))
    return generation


def read_ann_index(lancedb_uri: str, cfg: IndexConfig, load_index: bool = True) -> tuple[AnnIndex, str] | None:
    """The stored index (searched with ``cfg``'s nprobe) and its generation; None when none is stored.
    ``load_index=False`` reads what it holds without the index itself (``index`` None; from a local
    folder only the small members are read)."""
    path = location(lancedb_uri)
    try:
        if has_scheme(path):
            from pyarrow import fs

            filesystem, inner = fs.FileSystem.from_uri(path)
            with filesystem.open_input_file(inner) as f:
                source = io.BytesIO(f.read())
        else:
            source = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        with source, np.load(source) as npz:
            header = json.loads(npz["header"].tobytes())
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, this version reads {FORMAT}")
            slots = npz["slots"].tobytes().decode("utf-8").split("\n")
            index = knn.from_bytes(npz["index"], cfg) if load_index else None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, RuntimeError) as err:
        raise ValueError(f"stored caption index {path} cannot be read ({err}); delete it and the next index run rebuilds it") from None
    return AnnIndex(index, slots, header["key"], int(header["trained_on"])), header["generation"]
