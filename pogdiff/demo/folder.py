"""The demo catalogue written as a caption–image folder: the long-tailed data set the pipeline ingests.

``generate_longtail`` writes a catalogue (``pogdiff.demo.catalogue``: the looks, names, captions and
renders) as images, ``captions.csv`` and ``attributes.csv``, with held-out photos marked in a
``split`` column. Pure library code: numpy, PIL and the standard library only.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pogdiff.atomic import write_bytes_atomic
from pogdiff.demo.catalogue import (
    ATTRIBUTE_COMBINATIONS,
    CAPTION_MODES,
    CAPTIONS_FILE,
    CATALOGUES,
    CaptionMode,
    CatalogueKind,
    Instance,
    Product,
    Split,
    all_individuals,
    caption_attributes,
    families_products,
    image_caption,
    render,
    sample_instance,
)

_HOLDOUT_TRIES = 1000  # draws allowed per held-out photo to find a combination not yet taken


def longtail_counts(
    n_individuals: int = 24, max_count: int = 200, alpha: float = 1.3, min_count: int = 2
) -> list[int]:
    """Zipf-like images per rank: count(r) = max(min_count, round(max_count / r^alpha)), r = 1..n.

    With the defaults: 200, 81, 48, 33, ... , 3, 3 (529 images): 4 individuals above 30 images,
    6 between, 14 below 10 (the demo's many / medium / few buckets). A tail this thin is what makes
    the rare individuals hard: with 150 / r^1.1 (tail of 5 images) plain fine-tuning learnt the
    rare ones almost as well as the head (measured: few-bucket accuracy 0.87 against 0.95).
    """
    if n_individuals < 1:
        raise ValueError(f"n_individuals must be >= 1, got {n_individuals}")
    if not 1 <= min_count <= max_count:
        raise ValueError(f"need 1 <= min_count <= max_count, got {min_count} and {max_count}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return [max(min_count, round(max_count / r**alpha)) for r in range(1, n_individuals + 1)]


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # RGB from uint8 [H, W, 3]
    return buffer.getvalue()


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _novel_instance(rng: np.random.Generator, taken: set[tuple[str, str, str]], name: str) -> Instance:
    """A ``full`` instance whose ``caption_attributes`` are not in ``taken`` (which then holds them);
    RuntimeError after _HOLDOUT_TRIES draws."""
    for _ in range(_HOLDOUT_TRIES):
        instance = sample_instance(rng, "full")
        words = caption_attributes(instance)
        if words not in taken:
            taken.add(words)
            return instance
    raise RuntimeError(f"no new (size, position, background) for {name!r} in {_HOLDOUT_TRIES} draws")


def generate_longtail(
    out_dir: Path,
    seed: int = 0,
    size: int = 16,  # the embedded model's own resolution, so ingest never resamples the demo data
    max_count: int = 200,
    alpha: float = 1.3,
    min_count: int = 2,
    captions: CaptionMode = "per-image",
    holdout: int = 4,
    catalogue: CatalogueKind = "zipf",
) -> dict:
    """Write a long-tailed caption–image folder of a demo catalogue, with its ground truth.

    ``catalogue``: ``zipf``, the 24 individuals, where a seeded permutation ranks them and rank r
    gets ``longtail_counts(len, max_count, alpha, min_count)[r - 1]`` training photos; or
    ``families`` (``families_products``: fixed counts; max_count, alpha and min_count are not used).
    Each training photo is an independent ``full`` instance. ``captions``: ``per-image`` describes
    each image (``describe``: the product name plus its size, position and background, in one of
    three phrasings); ``individual`` gives every image of a product the same caption ("the Vexo logo").

    Every product also gets ``holdout`` held-out photos, drawn after all training photos from their
    own generator (``default_rng([seed, 1])``), so the training rows and images do not depend on
    ``holdout``: each shows the product in a (size, position, background) combination that none of
    its training photos and none of its other held-out photos has, captioned in the same mode.
    ValueError if a product's training photos leave fewer than ``holdout`` combinations unseen.

    Files (each written atomically; existing files of the same name are replaced, others are left alone):

    - ``images/<slug>_<nnnn>.png`` (training) and ``images/<slug>_h<nnn>.png`` (held out): RGB uint8
      [size, size, 3], e.g. ``images/vexo_0003.png``, ``images/vexo-gesh_h002.png``;
    - ``captions.csv``: image (path relative to ``out_dir``), caption, individual (the product
      name: the unit of the long tail, of the buckets and of gRecall), shape, colour, split
      (``train`` or ``holdout``);
    - ``attributes.csv``: image, individual, shape, colour, cx, cy, scale, rotation, background, split.

    Rows: the training photos in catalogue order (``all_individuals()`` for zipf), then by image
    number; then the held-out photos in the same order. The same arguments give byte-identical
    files. In ``zipf`` ranks are assigned without regard to the looks, so a rare individual's
    captions have neighbours of its own (other attributes, same name) and of other individuals
    (same attributes): the situation PoGDiff is built for.

    Returns ``{"images": training photos, "holdout": held-out photos, "individuals": products,
    "captions": distinct training captions, "counts": {name: training photos}}``.
    """
    if captions not in CAPTION_MODES:
        raise ValueError(f"unknown caption mode {captions!r}; expected one of {CAPTION_MODES}")
    if catalogue not in CATALOGUES:
        raise ValueError(f"unknown catalogue {catalogue!r}; expected one of {CATALOGUES}")
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    rng = np.random.default_rng(seed)
    if catalogue == "zipf":
        individuals = all_individuals()
        counts = longtail_counts(len(individuals), max_count, alpha, min_count)
        rank = rng.permutation(len(individuals))  # individual i gets rank rank[i] + 1
        products = [Product(ind.name, ind, counts[int(rank[i])]) for i, ind in enumerate(individuals)]
    else:
        products = families_products()
    (Path(out_dir) / "images").mkdir(parents=True, exist_ok=True)
    caption_rows: list[list[str]] = []
    attribute_rows: list[list[str]] = []

    def write(product: Product, instance: Instance, name: str, caption: str, split: Split) -> None:
        look = product.look
        write_bytes_atomic(Path(out_dir) / name, _png_bytes(render(look, instance, size)))
        caption_rows.append([name, caption, product.name, look.shape, look.colour, split])
        attribute_rows.append(
            [name, product.name, look.shape, look.colour]
            + [f"{v:.6f}" for v in (instance.cx, instance.cy, instance.scale, instance.rotation)]
            + [instance.background, split]
        )

    seen: dict[str, set[tuple[str, str, str]]] = {}
    for product in products:
        seen[product.name] = set()
        for k in range(product.count):
            instance = sample_instance(rng, "full")
            caption = image_caption(product, instance, captions, rng)
            seen[product.name].add(caption_attributes(instance))
            write(product, instance, f"images/{product.slug}_{k:04d}.png", caption, "train")
    n_train = len(caption_rows)
    combinations = ATTRIBUTE_COMBINATIONS
    held_rng = np.random.default_rng([seed, 1])
    for product in products:
        taken = seen[product.name]
        if combinations - len(taken) < holdout:
            raise ValueError(
                f"{product.name!r}: its {product.count} training photos leave {combinations - len(taken)} "
                f"(size, position, background) combinations unseen, fewer than holdout={holdout}"
            )
        for k in range(holdout):
            instance = _novel_instance(held_rng, taken, product.name)
            caption = image_caption(product, instance, captions, held_rng)
            write(product, instance, f"images/{product.slug}_h{k:03d}.png", caption, "holdout")
    write_bytes_atomic(
        Path(out_dir) / CAPTIONS_FILE,
        _csv_bytes(["image", "caption", "individual", "shape", "colour", "split"], caption_rows),
    )
    write_bytes_atomic(
        Path(out_dir) / "attributes.csv",
        _csv_bytes(
            ["image", "individual", "shape", "colour", "cx", "cy", "scale", "rotation", "background", "split"],
            attribute_rows,
        ),
    )
    return {
        "images": n_train,
        "holdout": len(caption_rows) - n_train,
        "individuals": len(products),
        "captions": len({row[1] for row in caption_rows[:n_train]}),
        "counts": {product.name: product.count for product in products},
    }
