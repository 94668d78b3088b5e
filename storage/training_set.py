"""Joins the Parquet dataset and the LanceDB tables into the arrays the trainer and evaluator use.

Only training rows (``split`` = ``train``) are ever trained on: ``load_training_set`` and
``load_real_set`` read those alone, and the caption index they join was built from their captions
(``storage.dataset.caption_counts``). The held-out rows are read by ``load_holdout_set``, for the
evaluation's held-out prompts only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from pogdiff.index import caption_id
from pogdiff.realset import RealSet, group_by_metadata, individual_keys
from storage import vectors
from storage.dataset import read_images
from storage.images import decode_images

log = logging.getLogger(__name__)


class DataVersion(BaseModel):
    """The data one flow run reads, fixed before training: the Parquet snapshot (its manifest lists
    the part files) and the LanceDB table versions the index stage wrote for it. Training,
    evaluation and the run's lineage use this one value, so rows ingested or indexed meanwhile are
    neither trained on nor missing from the record; the next run picks them up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    snapshot_id: str
    rows: int
    captions_version: int
    features_version: int


@dataclass(frozen=True)
class StoredTrainingSet:
    """N training images, C captions (sorted by caption id). images uint8 ``[N, s, s, 3]``; caption_of
    ``[N]``; nb_index ``[C, k]`` (-1 where missing); nb_sims ``[C, k]``; density, counts ``[C]``;
    features ``[N, F]``; individuals ``[N]``, the individual each image shows, or None where the
    dataset's metadata names none (``pogdiff.realset.individual_keys``)."""

    image_ids: list[str]
    images: np.ndarray
    caption_ids: list[str]
    captions: list[str]
    caption_of: np.ndarray
    nb_index: np.ndarray
    nb_sims: np.ndarray
    density: np.ndarray
    counts: np.ndarray
    features: np.ndarray
    individuals: list[str] | None


def load_training_set(dataset: str | Path, lancedb_uri: str, extractor: str, size: int,
                      version: DataVersion | None = None, individual_column: str | None = "individual") -> StoredTrainingSet:
    """Read every training image (held-out rows never) with its caption's neighbours, its image
    feature and its individual (``metadata[individual_column]``; ``individuals`` is None when
    ``individual_column`` is None or no image's metadata has the key): at ``version`` (the
    snapshot's rows, the tables as the index wrote them for it) or, without one, as they are now."""
    snapshot = version.snapshot_id if version is not None else None
    table = read_images(dataset, columns=["id", "caption", "image", "metadata"], snapshot=snapshot, split="train")
    if table.num_rows == 0:
        raise ValueError(f"dataset {dataset} has no training images; run ingest first")
    caps = vectors.read_caption_table(lancedb_uri, version.captions_version if version is not None else None)
    if caps is None:
        raise ValueError(f"LanceDB at {lancedb_uri} has no '{vectors.CAPTIONS}' table; run index first")
    cap_ids = caps.column("caption_id").to_pylist()
    row = {c: i for i, c in enumerate(cap_ids)}
    image_captions = table.column("caption").to_pylist()
    missing = {c for c in image_captions if caption_id(c) not in row}
    if missing:
        raise ValueError(f"{len(missing)} captions of the dataset are not indexed (e.g. {sorted(missing)[0]!r}); run index")
    image_ids = table.column("id").to_pylist()
    feats = vectors.read_image_features(lancedb_uri, extractor, version.features_version if version is not None else None)
    lacking = [i for i in image_ids if i not in feats]
    if lacking:
        raise ValueError(f"{len(lacking)} images have no '{extractor}' feature (e.g. {lacking[0]}); run index")
    names, grouped_by = individual_keys(image_captions, table.column("metadata").to_pylist(), individual_column)
    nb_ids = caps.column("neighbour_ids").to_pylist()
    return StoredTrainingSet(
        image_ids=image_ids,
        images=decode_images(table.column("image").to_pylist(), size),
        caption_ids=cap_ids,
        captions=caps.column("caption").to_pylist(),
        caption_of=np.array([row[caption_id(c)] for c in image_captions], np.int64),
        nb_index=np.array([[row.get(j, -1) for j in r] for r in nb_ids], np.int64),
        nb_sims=np.array(caps.column("neighbour_sims").combine_chunks().flatten(), np.float32).reshape(len(cap_ids), -1),
        density=caps.column("density").to_numpy().astype(np.float64, copy=True),
        counts=caps.column("count").to_numpy().astype(np.int64, copy=True),
        features=np.stack([feats[i] for i in image_ids]),
        individuals=names if grouped_by == "individual" else None,
    )


def load_real_set(dataset: str | Path, size: int, individual_column: str | None, snapshot: str | None = None) -> RealSet:
    """Every training image of ``snapshot`` (default: the dataset now; sorted by id, as
    ``load_training_set``) decoded to uint8 ``[R, size, size, 3]``,
    with its caption and its individual: ``metadata[individual_column]``, or its caption where the
    dataset's metadata has no such key (``group_by_metadata``)."""
    table = read_images(dataset, columns=["caption", "image", "metadata"], snapshot=snapshot, split="train")
    if table.num_rows == 0:
        raise ValueError(f"dataset {dataset} has no training images; run ingest first")
    images = decode_images(table.column("image").to_pylist(), size)
    return group_by_metadata(images, table.column("caption").to_pylist(), table.column("metadata").to_pylist(), individual_column)


def load_holdout_set(dataset: str | Path, size: int, individual_column: str | None, snapshot: str | None = None) -> RealSet | None:
    """The held-out images of ``snapshot`` (default: the dataset now; sorted by id) decoded to uint8
    ``[H, size, size, 3]``, grouped as ``load_real_set`` groups the training images of the same
    snapshot: by ``metadata[individual_column]`` when the training images name individuals (then
    every held-out image must name one too), else by caption; its names (sorted) are training names.

    A held-out image of an individual without training images cannot be bucketed (buckets are by
    training count): it is left out, with a warning naming how many and an example. None when the
    snapshot has no held-out image left.
    """
    held = read_images(dataset, columns=["caption", "image", "metadata"], snapshot=snapshot, split="holdout")
    if held.num_rows == 0:
        return None
    train = read_images(dataset, columns=["caption", "metadata"], snapshot=snapshot, split="train")
    trained, grouped_by = individual_keys(train.column("caption").to_pylist(), train.column("metadata").to_pylist(),
                                          individual_column)
    captions = held.column("caption").to_pylist()
    keys, held_by = individual_keys(captions, held.column("metadata").to_pylist(),
                                    individual_column if grouped_by == "individual" else None)
    if held_by != grouped_by:
        raise ValueError(f"the training images of {dataset} name their individual under metadata key "
                         f"{individual_column!r}, its held-out images do not")
    known = set(trained)
    kept = [r for r, key in enumerate(keys) if key in known]
    if len(kept) < len(keys):
        orphan = next(key for key in keys if key not in known)
        log.warning("%d of %d held-out images of %s show an individual without training images (e.g. %r); "
                    "they cannot be bucketed and are left out of the evaluation", len(keys) - len(kept), len(keys),
                    dataset, orphan)
    if not kept:
        return None
    names = sorted({keys[r] for r in kept})
    index = {n: i for i, n in enumerate(names)}
    images = decode_images(held.column("image").take(kept).to_pylist(), size)
    return RealSet(images, [captions[r] for r in kept], np.array([index[keys[r]] for r in kept], np.int64), names, grouped_by)
