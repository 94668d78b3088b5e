"""The real images an evaluation compares generated ones with, and who each one shows.

The unit of the long tail is the *individual* (a product, a person), named by a metadata column;
data without one fall back to one individual per distinct caption (``individual_keys``). The
training images and the held-out photos of an evaluation are each a ``RealSet``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

GroupedBy = Literal["individual", "caption"]


@dataclass(frozen=True)
class RealSet:
    """Real images that generated ones are compared with (the training images, or the held-out
    photos), and who each one shows.

    images uint8 ``[R, H, W, 3]``; captions ``[R]``; group int ``[R]``, image r shows individual
    ``names[group[r]]`` (``C`` distinct names, each with at least one image); grouped_by says whether
    the names come from an individual column or are the distinct captions themselves.
    """

    images: np.ndarray
    captions: list[str]
    group: np.ndarray
    names: list[str]
    grouped_by: GroupedBy = "individual"

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise ValueError("evaluation needs at least one real image")
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"real images must be uint8 [R, H, W, 3], got {self.images.dtype} {self.images.shape}")
        if not len(self.images) == len(self.captions) == len(self.group):
            raise ValueError(f"{len(self.images)} real images, {len(self.captions)} captions and "
                             f"{len(self.group)} group ids: one of each per image")
        if len(set(self.names)) != len(self.names):
            raise ValueError("individual names must be distinct")
        group = np.asarray(self.group)
        if not np.issubdtype(group.dtype, np.integer) or group.min() < 0 or group.max() >= len(self.names):
            raise ValueError(f"group ids must be integers in 0..{len(self.names) - 1} (indices into names)")
        object.__setattr__(self, "group", group.astype(np.int64))
        empty = np.flatnonzero(np.bincount(group, minlength=len(self.names)) == 0)
        if len(empty):
            raise ValueError(f"individual {self.names[empty[0]]!r} has no real images")
        if self.grouped_by not in ("individual", "caption"):
            raise ValueError(f"grouped_by must be 'individual' or 'caption', got {self.grouped_by!r}")

    @property
    def counts(self) -> np.ndarray:
        """|T_i|: training images per individual, int ``[C]``."""
        return np.bincount(self.group, minlength=len(self.names))


def group_by_metadata(images: np.ndarray, captions: list[str], metadata: list[str], column: str | None) -> RealSet:
    """A ``RealSet`` grouped by ``metadata[r][column]``, or by caption where no image names one
    (``individual_keys``). Names are sorted."""
    keys, grouped_by = individual_keys(captions, metadata, column)
    names = sorted(set(keys))
    index = {n: i for i, n in enumerate(names)}
    return RealSet(images, list(captions), np.array([index[k] for k in keys], np.int64), names, grouped_by)


def individual_keys(captions: list[str], metadata: list[str], column: str | None) -> tuple[list[str], GroupedBy]:
    """Who each image shows: ``([R] names, grouped_by)``.

    metadata: per image, a JSON object (the dataset's ``metadata`` column). With ``column`` set and
    a non-empty string or integer value under it in every image's metadata, the names are those
    values (``grouped_by="individual"``); with ``column`` None or under no image at all, each
    image's caption is its name (``grouped_by="caption"``). Raises ``ValueError`` when only some
    images name an individual (which group would the others join?) or when a metadata entry is not
    a JSON object.
    """
    if len(metadata) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(metadata)} metadata entries")
    if column is not None:
        values = [_individual(m, column, r) for r, m in enumerate(metadata)]
        named = [v for v in values if v is not None]
        if named and len(named) < len(values):
            missing = values.index(None)
            raise ValueError(f"metadata key {column!r} is missing or empty for {len(values) - len(named)} of "
                             f"{len(values)} images (e.g. image {missing}, caption {captions[missing]!r})")
        if named:
            return named, "individual"
    return list(captions), "caption"


def _individual(metadata: str, column: str, row: int) -> str | None:
    try:
        obj = json.loads(metadata)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata of image {row} is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"metadata of image {row} must be a JSON object, got {type(obj).__name__}")
    value = obj.get(column)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"metadata key {column!r} of image {row} must be a string or an integer, got {value!r}")
    return str(value)
