"""Where a file store lives, a local folder or a prefix of an S3 bucket, behind one interface.

``Location.of(where)`` takes a local path (relative or absolute) or an ``s3://bucket/prefix`` URI.
Both are read through :mod:`pyarrow.fs` (``LocalFileSystem`` / ``S3FileSystem``), so Parquet
readers take ``location.fs`` and paths from ``location.path(...)``. Whole files are written by
``write``, never visible half-written:

* locally through :func:`pogdiff.atomic.write_atomic` (temporary sibling, fsync, rename);
* on S3 by one PUT of the whole object to its final key (boto3): S3 makes an object visible only
  once its PUT has completed, so there are no temporary objects to clean up after a crash.

S3 is reached at the endpoint of ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (unset: AWS
itself), in ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (unset: the bucket's own region on AWS,
us-east-1 at another endpoint), with the keys of the AWS
SDKs' own chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role).
A URI never carries them: one with a user, password or query string is refused.
"""

from __future__ import annotations

import fnmatch
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pogdiff.atomic import write_atomic
from storage.links import has_scheme, redact_uri

__all__ = ["Location", "is_s3", "s3_client"]

DEFAULT_REGION = "us-east-1"


def is_s3(where: object) -> bool:
    """Whether ``where`` is an ``s3://`` URI."""
    return has_scheme(str(where)) and urlsplit(str(where)).scheme.lower() == "s3"


def s3_endpoint() -> str | None:
    """The S3 endpoint the environment names (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL), None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_client():
    """A boto3 S3 client for the environment's endpoint, region and keys (one per such setting and
    thread-safe, so it is shared)."""
    env = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return _client(s3_endpoint(), _region() or DEFAULT_REGION, tuple(os.environ.get(name) for name in env))


@lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str, _keys: tuple):  # _keys: a new client when the keys change
    import boto3

    # a session of its own: boto3's default session resolves the keys once per process and keeps them,
    # so a client made after the keys changed would still sign with the old ones
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region)


@lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    return pafs.resolve_s3_region(bucket)


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    if endpoint is None:  # AWS answers a request in another region than the bucket's with an error
        return pafs.S3FileSystem(region=_region() or _bucket_region(bucket))
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    return pafs.S3FileSystem(region=_region() or DEFAULT_REGION, endpoint_override=parts.netloc, scheme=parts.scheme)


@dataclass(frozen=True)
class Location:
    """``uri``: the location as given (in messages); ``root``: its path in ``fs``, its filesystem
    (an absolute local path, or ``bucket/prefix`` without a trailing slash)."""

    uri: str | Path
    root: str

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        """The location of a local path or an ``s3://bucket/prefix`` URI; ValueError for other schemes
        and for URIs that carry credentials or options."""
        if isinstance(where, Location):
            return where
        if not has_scheme(where):
            return cls(Path(where), str(Path(where).absolute()))
        parts = urlsplit(str(where))
        if not is_s3(where):
            raise ValueError(f"{redact_uri(str(where))}: only local folders and s3://bucket/prefix are supported here")
        if parts.query or "@" in parts.netloc or not parts.netloc:
            raise ValueError(f"{redact_uri(str(where))}: give s3://bucket/prefix; the endpoint and keys come from "
                             "the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
        root = f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")
        return cls(str(where).rstrip("/"), root)

    @property
    def remote(self) -> bool:
        return not isinstance(self.uri, Path)

    @cached_property
    def fs(self) -> pafs.FileSystem:
        # made on first use: naming a location (display) must not reach the store
        return _s3_filesystem(self.bucket_key(self.root)[0]) if self.remote else pafs.LocalFileSystem()

    def path(self, *parts: str) -> str:
        """The path of ``parts`` under the root, in ``fs``."""
        return "/".join((self.root, *parts))

    def relative(self, path: str) -> str:
        """``path`` (in ``fs``) relative to the root, with forward slashes."""
        return path[len(self.root) + 1 :]

    def display(self, *parts: str) -> str | Path:
        """``parts`` under the location as a user names it: a Path locally, else a URI."""
        return Path(self.uri, *parts) if not self.remote else "/".join((str(self.uri), *parts))

    def is_dir(self) -> bool:
        """Whether the location exists (on S3: whether any object lies under the prefix)."""
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def list(self, sub: str, pattern: str) -> list[str]:
        """Sorted paths of the files directly in ``sub`` whose names match the glob ``pattern``."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(sub), allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern))

    def missing(self, paths: list[str]) -> list[str]:
        """Those of ``paths`` that are not files."""
        return [i.path for i in self.fs.get_file_info(paths) if i.type != pafs.FileType.File]

    def exists(self, path: str) -> bool:
        return not self.missing([path])

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def write(self, path: str, write: Callable[[BinaryIO], object]) -> None:
        """Call ``write(handle)`` and store what it wrote at ``path`` as a whole (see the module's
        docstring); a ``write`` that raises stores nothing."""
        if not self.remote:
            write_atomic(path, write)
            return
        buffer = io.BytesIO()
        write(buffer)
        bucket, key = self.bucket_key(path)
        s3_client().put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())

    def bucket_key(self, path: str) -> tuple[str, str]:
        """``(bucket, key)`` of an S3 ``path``."""
        bucket, _, key = path.partition("/")
        return bucket, key
