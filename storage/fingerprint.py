"""Cheap identities for cache keys: what a source looks like on disk, and which store instance is which.

Both are computed from metadata only (names, sizes, modification times), never from file contents,
so a retrain over a 100k-image source decides "unchanged" with one directory walk.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from botocore.exceptions import ClientError

from storage.links import has_scheme
from storage.location import Location, is_s3, s3_client

GENERATION_FILE = ".pogdiff-generation"


def source_fingerprint(source: str | Path) -> str:
    """sha256 over ``relative path, size, mtime_ns`` of every file under ``source`` (or of the file).

    Symlinks are described by their own metadata, never followed, so a link to a huge tree costs
    nothing here (ingest rejects links out of the root anyway). A missing source gets a fingerprint
    of its own ("missing:<path>") so the ingest that follows fails with its clear error, uncached.
    Remote sources (``s3://…``) are keyed by their URI alone.
    """
    if has_scheme(source):
        return "uri:" + str(source)
    root = Path(source)
    if not os.path.lexists(root):
        return f"missing:{root}"
    digest = hashlib.sha256()
    if root.is_file():
        entries = [(root.name, root.lstat())]
    else:
        entries = []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                entries.append((path.relative_to(root).as_posix(), path.lstat()))
    for rel, st in entries:
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def store_generation(location: str | Path) -> str:
    """A random id stored inside a store, a local directory or an S3 prefix (the object
    ``<prefix>/.pogdiff-generation``), created on first use.

    Deleting or replacing the store (the directory, or the bucket or prefix) gives a new id, so
    results cached for the old store are never reused for the new one. Stores behind other URI
    schemes are identified by their URI.
    """
    if is_s3(location):
        return _s3_generation(Location.of(location))
    if has_scheme(location):
        return "uri:" + str(location)
    folder = Path(location)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / GENERATION_FILE
    try:
        return marker.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    tmp = folder / f"{GENERATION_FILE}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(uuid.uuid4().hex, encoding="ascii")
    try:
        os.link(tmp, marker)  # atomic create-if-absent: a concurrent creator's id wins, never both
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return marker.read_text(encoding="ascii").strip()


def _s3_generation(store: Location) -> str:
    bucket, key = store.bucket_key(store.path(GENERATION_FILE))
    client = s3_client()
    read = lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("ascii").strip()  # noqa: E731
    try:
        return read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "NoSuchKey":
            raise
    try:  # If-None-Match: the first writer's id wins, a concurrent one is refused (412) and reads it
        client.put_object(Bucket=bucket, Key=key, Body=uuid.uuid4().hex.encode("ascii"), IfNoneMatch="*")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
    return read()
