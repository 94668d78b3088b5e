"""Checking and normalising one image: what the ingest worker pool runs.

Kept apart from the dataset code so a spawned worker process imports only PIL, the config and the
source types. Every function here is pure (bytes or a path in, a :class:`Checked` out) and safe in
threads.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from storage.config import IngestConfig
from storage.items import Item, Reason, one_line, printable

__all__ = ["Checked", "check", "check_many", "init_worker", "normalise", "own_pixel_limit"]

_WEBP_QUALITY = 90


@dataclass(frozen=True)
class Checked:
    """An item after the image checks. ``reason`` set: rejected. Otherwise ``image`` is the
    normalised square RGB image, encoded; ``id`` = sha256(original bytes + NUL + caption)[:32]."""

    item: Item
    reason: Reason | None = None
    message: str = ""
    id: str = ""
    image_sha256: str = ""  # of the original bytes alone
    image: bytes = b""
    format: str = ""  # the original's PIL format name
    width: int = 0  # the original's size
    height: int = 0


def normalise(im: Image.Image, cfg: IngestConfig) -> bytes:
    """Decoded image -> encoded square RGB image of side ``cfg.resolution`` (or the image's own
    shorter/longer side when it is smaller and ``cfg.upscale`` is off).

    ``center_crop`` keeps the central ``min(w, h)`` square; ``pad`` centres the image on a black
    ``max(w, h)`` square. Transparency is flattened onto white. Resampling is bicubic.
    """
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))
    elif im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    if cfg.aspect == "center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        if (w, h) != (side, side):
            im = im.crop((left, top, left + side, top + side))
    else:
        side = max(w, h)
        if (w, h) != (side, side):
            square = Image.new("RGB", (side, side), (0, 0, 0))
            square.paste(im, ((side - w) // 2, (side - h) // 2))
            im = square
    target = cfg.resolution if cfg.upscale else min(cfg.resolution, side)
    if side != target:
        im = im.resize((target, target), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if cfg.image_encoding == "png":
        im.save(buffer, "PNG")
    else:
        im.save(buffer, "WEBP", quality=_WEBP_QUALITY)
    return buffer.getvalue()


def _read(item: Item, max_bytes: int) -> bytes | Checked:
    """The item's bytes, reading its file after the path and size checks; a Checked rejection otherwise."""

    def reject(reason: Reason, message: str) -> Checked:
        return Checked(replace(item, data=None), reason, f"{printable(item.key)}: {message}")

    if item.data is not None:
        if len(item.data) > max_bytes:
            return reject(Reason.TOO_LARGE, f"{len(item.data)} bytes, more than max_image_bytes={max_bytes}")
        return item.data
    assert item.path is not None, "an item to check has a path or data"

    try:
        real = Path(os.path.realpath(item.path))
        if not real.is_relative_to(item.root):
            return reject(Reason.PATH_OUTSIDE_SOURCE, "symlink resolves outside the source folder")
        if not real.is_file():
            return reject(Reason.MISSING_FILE, "not a regular file" if real.exists() else "no such file")
        if (size := real.stat().st_size) > max_bytes:  # checked before reading, so it is never in memory
            return reject(Reason.TOO_LARGE, f"{size} bytes, more than max_image_bytes={max_bytes}")
        return real.read_bytes()
    except ValueError as err:  # e.g. a NUL character in the path
        return reject(Reason.MISSING_FILE, f"not a usable path ({one_line(err)})")
    except OSError as err:
        return reject(Reason.MISSING_FILE, f"cannot read the file ({one_line(err.strerror or err)})")


def check(item: Item, cfg: IngestConfig) -> Checked:
    """Read, validate and normalise one image; the checks in order: readable, non-empty, an image,
    allowed format, pixel count (from the header, before any decoding), minimum side, full decode."""

    data = _read(item, cfg.max_image_bytes)
    if isinstance(data, Checked):
        return data
    item = replace(item, data=None)  # the original bytes do not travel back to the parent process

    def reject(reason: Reason, message: str) -> Checked:
        return Checked(item, reason, f"{printable(item.key)}: {message}")

    if not data:
        return reject(Reason.NOT_AN_IMAGE, "empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # only if PIL's own limit was re-armed meanwhile
        return reject(Reason.TOO_MANY_PIXELS, one_line(err))
    except Exception as err:  # noqa: BLE001 - any failure to identify is "not an image"
        return reject(Reason.NOT_AN_IMAGE, f"not a recognised image ({one_line(err)})")
    with im:
        fmt, (width, height) = im.format or "", im.size
        if fmt not in cfg.allowed_formats:
            return reject(
                Reason.FORMAT_NOT_ALLOWED, f"format {fmt or 'unknown'} is not in allowed_formats {list(cfg.allowed_formats)}"
            )
        if width * height > cfg.max_pixels:
            return reject(
                Reason.TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels, more than max_pixels={cfg.max_pixels}"
            )
        if min(width, height) < cfg.min_side:
            return reject(Reason.TOO_SMALL, f"{width}x{height}, a side is smaller than min_side={cfg.min_side}")
        try:
            im.load()
            image = normalise(im, cfg)
        except Exception as err:  # noqa: BLE001 - any decode failure means damaged data
            return reject(Reason.TRUNCATED, f"cannot decode the image data ({one_line(err)})")
    digest = hashlib.sha256(data)
    image_sha256 = digest.hexdigest()
    digest.update(b"\0" + item.caption.encode("utf-8"))
    return Checked(
        item, id=digest.hexdigest()[:32], image_sha256=image_sha256, image=image, format=fmt, width=width, height=height
    )


def check_many(items: list[Item], cfg: IngestConfig) -> list[Checked]:
    """:func:`check` over a batch: one pool task per batch keeps the inter-process traffic low."""
    return [check(item, cfg) for item in items]


def init_worker() -> None:
    """Pool-process initializer: ``max_pixels`` is checked from the header instead of PIL's own
    limit (which would warn, or refuse, earlier and with a different outcome)."""
    Image.MAX_IMAGE_PIXELS = None


_PIL_LOCK = threading.Lock()
_PIL_USERS = 0
_PIL_SAVED: int | None = None


@contextmanager
def own_pixel_limit() -> Iterator[None]:
    """:func:`init_worker` for threads in this process: PIL's limit is off while any ingest runs
    here and restored when the last one ends."""
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
