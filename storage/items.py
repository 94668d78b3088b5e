"""One input of a caption–image source, and the text-level checks every reader applies.

An :class:`Item` either carries a :class:`Reason` already (rejected on text or path grounds) or the
image to check: a path to read (folder rows, Parquet path rows) or the bytes (Parquet bytes, tar
members). The image checks run in the worker pool (:mod:`storage.validate`); a spawned worker
imports this module, which needs neither pyarrow nor the readers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any, Literal, get_args

from storage.config import IngestConfig

__all__ = ["SPLITS", "Item", "Reason", "SourceError", "Split", "one_line", "path_item", "printable", "text_item", "unsafe_key"]

BAD_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of invalid bytes
_SEPARATORS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:")

# Which photos train and which are held out for evaluation: a held-out photo never enters training
# (neither as a training image nor as a caption of the index) and is only ever a prompt and a reference.
Split = Literal["train", "holdout"]
SPLITS: tuple[Split, ...] = get_args(Split)


class SourceError(Exception):
    """The source as a whole cannot be read; the message is one line naming the file or folder."""


class Reason(StrEnum):
    """Why an input was quarantined."""

    MALFORMED_ROW = "malformed_row"  # unparsable row / sample, or one without an image or caption field
    MISSING_FILE = "missing_file"
    PATH_OUTSIDE_SOURCE = "path_outside_source"  # '..', absolute path, symlink out, tar link member
    NOT_AN_IMAGE = "not_an_image"  # zero bytes, text, unknown format
    TRUNCATED = "truncated"  # the header reads but the pixel data does not decode
    FORMAT_NOT_ALLOWED = "format_not_allowed"
    TOO_SMALL = "too_small"
    TOO_MANY_PIXELS = "too_many_pixels"
    EMPTY_CAPTION = "empty_caption"
    INVALID_UTF8 = "invalid_utf8"
    CAPTION_TOO_LONG = "caption_too_long"
    TOO_LARGE = "too_large"  # more bytes than max_image_bytes / max_member_bytes, never read
    DUPLICATE = "duplicate"
    SAME_IMAGE_OTHER_CAPTION = "same_image_other_caption"
    INVALID_SPLIT = "invalid_split"  # a split value other than train, holdout or empty
    SPLIT_CONFLICT = "split_conflict"  # the same image bytes already accepted in the other split


@dataclass(frozen=True)
class Item:
    """One input. ``reason`` set: rejected already. Otherwise exactly one of ``path`` (a file to
    read, which must resolve inside ``root``) and ``data`` (the encoded image) is set."""

    key: str
    caption: str = ""
    metadata: str = "{}"  # JSON object of the extra columns (the split column is not one of them)
    split: Split = "train"
    path: str | None = None
    data: bytes | None = None
    root: str = ""
    reason: Reason | None = None
    message: str = ""


# a Python object's repr inside a library's message ("cannot identify image file <_io.BytesIO object at 0x7f…>")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def one_line(text: object) -> str:
    """``text`` on one line, without any Python object's repr in it."""
    return " ".join(_OBJECT_REPR.sub("", str(text)).split())


def printable(text: str) -> str:
    """Text that may hold escaped invalid bytes, made valid UTF-8 (bad bytes shown as \\xNN)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def has_bad_utf8(value: Any) -> bool:
    """True if any string in ``value`` (nested dicts/lists included) holds escaped invalid bytes."""
    if isinstance(value, str):
        return BAD_UTF8.search(value) is not None
    if isinstance(value, dict):
        return any(has_bad_utf8(k) or has_bad_utf8(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_bad_utf8(v) for v in value)
    return False


def unsafe_key(key: str) -> bool:
    """Absolute paths and ``..`` components (either separator, so a key means the same everywhere)."""
    if key.startswith(("/", "\\")) or _DRIVE.match(key) or PurePath(key).is_absolute():
        return True
    return ".." in _SEPARATORS.split(key)


def _split(value: Any) -> Split | None:
    """The split a source value names (no value or an empty string: ``train``), or None if it names none."""
    if value is None or value == "":
        return "train"
    return value if isinstance(value, str) and value in SPLITS else None


def text_item(key: str, caption: Any, extra: dict[str, Any], where: str, cfg: IngestConfig, **image: Any) -> Item:
    """Text-level validation of one input (UTF-8, split, caption); ``image`` holds path/data/root.

    ``extra`` holds the source's other columns; ``extra[cfg.split_column]`` becomes the item's split
    (exactly ``train`` or ``holdout``; absent or empty: ``train``) and the rest its metadata.
    """
    if has_bad_utf8([key, caption, extra]):
        shown = printable(json.dumps([caption, extra], ensure_ascii=False))
        return Item(
            printable(key),
            reason=Reason.INVALID_UTF8,
            message=f"{where}: not valid UTF-8 (bad bytes as \\xNN): {one_line(shown)[:200]}",
        )
    value = extra.get(cfg.split_column)
    split = _split(value)
    if split is None:
        shown = f"'{value}'" if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        return Item(
            key,
            reason=Reason.INVALID_SPLIT,
            message=f"{where}: {cfg.split_column} must be 'train' or 'holdout', got {one_line(shown)[:200]}",
        )
    extra = {k: v for k, v in extra.items() if k != cfg.split_column}
    if caption is not None and not isinstance(caption, str):
        return Item(
            key,
            reason=Reason.MALFORMED_ROW,
            message=f"{where}: field '{cfg.caption_column}' is {type(caption).__name__}, not text",
        )
    caption = (caption or "").strip()
    if not caption:
        return Item(key, reason=Reason.EMPTY_CAPTION, message=f"{where}: caption is empty")
    if len(caption) > cfg.max_caption_chars:
        if cfg.caption_overflow == "reject":
            return Item(
                key,
                reason=Reason.CAPTION_TOO_LONG,
                message=f"{where}: caption has {len(caption)} characters, "
                f"more than max_caption_chars={cfg.max_caption_chars}",
            )
        caption = caption[: cfg.max_caption_chars].rstrip()
    metadata = json.dumps(extra, ensure_ascii=False, sort_keys=True, default=str)
    return Item(key, caption=caption, metadata=metadata, split=split, **image)


def path_item(key: str, rel: Any, caption: Any, extra: dict, where: str, root: Path, cfg: IngestConfig) -> Item:
    """An input whose image is the file ``rel`` under ``root``."""
    if not isinstance(rel, str) or not rel:
        what = "missing" if rel is None else "empty" if rel == "" else "not a string"
        return Item(key, reason=Reason.MALFORMED_ROW, message=f"{where}: field '{cfg.image_column}' is {what}")
    if not has_bad_utf8(rel) and unsafe_key(rel):
        return Item(key, reason=Reason.PATH_OUTSIDE_SOURCE, message=f"{where}: {rel}: absolute path or '..' in the image path")
    return text_item(key, caption, extra, where, cfg, path=str(root / rel), root=str(root))

