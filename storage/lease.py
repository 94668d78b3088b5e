"""An exclusive, expiring lease on an S3 object: the ingest lock of a dataset stored on S3, where
there is no ``flock``.

Semantics (``hold(bucket, key, ttl_s)``):

* **Acquire.** A PUT of the lease object with ``If-None-Match: *``: S3 creates it only if no object
  has that key, so of any number of concurrent claimants exactly one succeeds; the others get 412
  (or 409 while the creation is in flight). The body names the holder (a random id, host, pid) and
  its ``ttl_s``.
* **Wait.** A refused claimant reads the lease and polls (0.2 s, doubling to 2 s) until it is gone
  or expired, then claims again. It waits as long as the holder keeps the lease.
* **Expiry.** The holder renews the lease every ``ttl_s / 3`` (a PUT with ``If-Match`` its own ETag,
  which refreshes the object's LastModified). A lease not renewed for ``ttl_s``, because its holder
  crashed, was killed or lost the store, has expired: a claimant deletes it with ``If-Match`` the
  ETag it read, so it removes that stale lease and never a fresh one another claimant created
  meanwhile, and claims again. Age is measured on the server's clock (the reply's ``Date`` minus the
  lease's ``LastModified``), so the hosts' clocks need not agree.
* **Loss.** A holder whose renewal finds the lease gone or replaced, or that could not renew it
  for ``ttl_s`` (the store unreachable), has lost it; ``check()`` then raises :class:`LeaseLost`.
  The ingest checks before every write, so a holder that stalled past its ttl stops instead of
  writing beside the next one; only a write already in flight at that moment can still land.
* **Release.** A DELETE with ``If-Match`` its ETag, on leaving the ``with`` block (a lease already
  lost is left to its new holder). If the store cannot be reached then, the lease is left to expire,
  and the error that ended the block is the one raised.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from botocore.exceptions import ClientError

from storage.location import s3_client

__all__ = ["LEASE_TTL_S", "Lease", "LeaseLost", "hold"]

log = logging.getLogger(__name__)

LEASE_TTL_S = 60.0  # how long a crashed holder blocks the next ingest
_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_GONE = {"NoSuchKey", "404"}


class LeaseLost(RuntimeError):
    """The lease expired or was taken over while it was held."""


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class Lease:
    """One held lease; ``check()`` raises LeaseLost once it is no longer held."""

    def __init__(self, bucket: str, key: str, etag: str, body: bytes, ttl_s: float):
        self.bucket, self.key, self.etag, self._body, self.ttl_s = bucket, key, etag, body, ttl_s
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"lease {key}", daemon=True)
        self._renewer.start()

    def check(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"the lease s3://{self.bucket}/{self.key} was lost while held: {self._lost}")

    def _renew(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                s3_client().put_object(Bucket=self.bucket, Key=self.key, Body=self._body, IfMatch=self.etag)
                renewed = time.monotonic()
            except ClientError as err:
                if _code(err) in _TAKEN | _GONE:
                    self._lost = "another holder took it over after it expired"
                    return
            except Exception:  # noqa: BLE001 - the store unreachable: keep trying until the ttl is spent
                pass
            if time.monotonic() - renewed > self.ttl_s:
                self._lost = f"not renewed for {self.ttl_s:.0f} s (the store unreachable)"
                return

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        if self._lost is None:
            try:
                s3_client().delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except Exception as err:  # noqa: BLE001 - whatever kept it, the lease expires on its own
                why = _code(err) if isinstance(err, ClientError) else type(err).__name__
                if why not in _TAKEN | _GONE:
                    log.warning("could not release the lease s3://%s/%s (%s); it expires in %.0f s", self.bucket, self.key,
                                why, self.ttl_s)


def _claim(bucket: str, key: str, body: bytes) -> str | None:
    """The new lease's ETag, or None when the key is taken."""
    try:
        return s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
    except ClientError as err:
        if _code(err) in _TAKEN:
            return None
        raise


def _cleared(bucket: str, key: str) -> bool:
    """Whether the lease at ``key`` is gone, deleting it first if it has expired; False while it is fresh."""
    client = s3_client()
    try:
        current = client.get_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if _code(err) in _GONE:
            return True
        raise
    ttl_s = float(json.loads(current["Body"].read()).get("ttl_s", LEASE_TTL_S))
    now = parsedate_to_datetime(current["ResponseMetadata"]["HTTPHeaders"]["date"])
    if (now - current["LastModified"]).total_seconds() <= ttl_s:
        return False
    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=current["ETag"])
    except ClientError as err:
        if _code(err) not in _TAKEN | _GONE:  # renewed or cleared meanwhile: claim again
            raise
    return True


@contextmanager
def hold(bucket: str, key: str, ttl_s: float = LEASE_TTL_S) -> Iterator[Lease]:
    """Hold the lease ``s3://bucket/key`` for the ``with`` block, waiting for it as long as it is held
    elsewhere (see the module's docstring)."""
    body = json.dumps({"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "ttl_s": ttl_s,
                       "acquired_at": datetime.now(timezone.utc).isoformat()}).encode()
    delay = 0.2
    while (etag := _claim(bucket, key, body)) is None:
        if not _cleared(bucket, key):
            time.sleep(delay)
            delay = min(2.0 * delay, 2.0)
    lease = Lease(bucket, key, etag, body, ttl_s)
    try:
        yield lease
    finally:
        lease.release()
