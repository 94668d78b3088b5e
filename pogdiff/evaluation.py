"""The evaluate stage as one library call: generate images per individual, score them per bucket.

The unit of the long tail is the *individual* (a product, a person), not the caption: a catalogue
describes every image of an individual in its own words, so captions are nearly unique while the
individual recurs. Counts, buckets, gRecall, accuracy and the grids are therefore per individual;
data without an individual column fall back to one individual per distinct caption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from pogdiff.config import EvaluateConfig
from pogdiff.features import make_extractor
from pogdiff.glossary import frechet_metric
from pogdiff.metrics import (
    BUCKETS,
    FRECHET_MIN_SAMPLES,
    assign_buckets,
    bucket_means,
    feature_similarity,
    frechet_distance,
    grecall,
    grecall_normalised,
    nearest_group,
    per_group_mean,
    separability,
)

GroupedBy = Literal["individual", "caption"]


class ImageGenerator(Protocol):
    """What evaluation needs of a pipeline (pixel-space or Stable Diffusion)."""

    image_size: int

    def generate(
        self,
        prompts: list[str],
        num_images_per_prompt: int,
        seed: int,
        guidance_scale: float,
        num_inference_steps: int,
        batch_size: int,
    ) -> np.ndarray:
        """uint8 ``[len(prompts) * num_images_per_prompt, H, W, 3]``, prompt-major; image n's noise
        depends only on (seed, n), so the result does not depend on ``batch_size``."""


class Judge(Protocol):
    """An exact judge of generated images (e.g. ``pogdiff.demo.detector.judge`` on demo data).

    Given uint8 ``[G, H, W, 3]`` images and the name of the individual each was generated for,
    returns the name of the individual each image shows (None: it shows none the judge can tell),
    or None as a whole when the judge cannot judge this data (then the gate is the nearest-individual test).
    """

    def __call__(self, images: np.ndarray, individuals: list[str]) -> list[str | None] | None: ...


@dataclass(frozen=True)
class RealSet:
    """The training images that generated ones are compared with, and who each one shows.

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
    """A ``RealSet`` grouped by ``metadata[r][column]``, or by caption where no image names one.

    metadata: per image, a JSON object (the dataset's ``metadata`` column). With ``column`` set and
    a non-empty string or integer value under it in every image's metadata, the groups are those
    values (``grouped_by="individual"``); with ``column`` None or under no image at all, each
    distinct caption is its own group (``grouped_by="caption"``). Names are sorted. Raises
    ``ValueError`` when only some images name an individual (which group would the others join?)
    or when a metadata entry is not a JSON object.
    """
    if len(metadata) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(metadata)} metadata entries")
    keys: list[str] = list(captions)
    grouped_by: GroupedBy = "caption"
    if column is not None:
        values = [_individual(m, column, r) for r, m in enumerate(metadata)]
        named = [v for v in values if v is not None]
        if named and len(named) < len(values):
            missing = values.index(None)
            raise ValueError(f"metadata key {column!r} is missing or empty for {len(values) - len(named)} of "
                             f"{len(values)} images (e.g. image {missing}, caption {captions[missing]!r})")
        if named:
            keys, grouped_by = named, "individual"
    names = sorted(set(keys))
    index = {n: i for i, n in enumerate(names)}
    return RealSet(images, list(captions), np.array([index[k] for k in keys], np.int64), names, grouped_by)


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


def images_per_individual(counts: np.ndarray, cfg: EvaluateConfig) -> np.ndarray:
    """N_i = max(N_min, min(|T_i|, N_max)) generated images per individual, int ``[C]`` from counts ``[C]``."""
    return np.maximum(cfg.min_images_per_individual, np.minimum(counts, cfg.max_images_per_individual))


def draw_sources(members: np.ndarray, n: int, seed: int, individual: int) -> np.ndarray:
    """The training images whose captions prompt an individual's n generated images: ``[n]`` of ``members``.

    n <= |members|: a draw without replacement, so image j is generated from the caption of a
    distinct real image j; n > |members|: a permutation cycled through, so every caption is used
    floor(n / |members|) or ceil(n / |members|) times. The generator is seeded by
    (seed, individual), so one individual's draw does not depend on the others'.
    """
    rng = np.random.default_rng([seed, individual])
    if n <= len(members):
        return members[rng.choice(len(members), n, replace=False)]
    return members[rng.permutation(len(members))[np.arange(n) % len(members)]]


@dataclass
class EvalResult:
    """What one evaluation measured and generated.

    metrics: ``{"<bucket>/<metric>": value}``; per_individual: one row per individual (individual,
    count = |T_i|, bucket, images = N_i, distinct_captions, then each metric or None); samples[i]:
    uint8 ``[N_i, H, W, 3]``; prompts[i]: the N_i captions they were generated from; sources[i]: int
    ``[N_i]``, the real image (row of ``RealSet.images``) whose caption prompted sample j. info: what
    the numbers were computed from (grouping, gate, extractor, N, seed, ...) and, per bucket, the
    image counts behind its Fréchet distance or why it was left out.
    """

    metrics: dict[str, float]
    per_individual: list[dict]
    samples: list[np.ndarray]
    prompts: list[list[str]]
    sources: list[np.ndarray]
    info: dict[str, str | int | float] = field(default_factory=dict)


def bucket_frechet(
    real_features: torch.Tensor,
    real_ids: torch.Tensor,
    gen_features: torch.Tensor,
    gen_ids: torch.Tensor,
    buckets: list[str],
    name: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """Fréchet distance per bucket and overall: generated vs real images of the bucket's individuals,
    pooled (overall: every individual's images in one set, not a mean of the buckets).

    Features ``[R, F]`` / ``[G, F]`` with individual ids ``[R]`` / ``[G]``; ``buckets[c]`` is
    individual c's bucket; ``name`` is the metric's name (``glossary.frechet_metric``). Returns
    ``({"<bucket>/<name>": d2}, {"<name>.<bucket>": note})``: a bucket with fewer than
    ``FRECHET_MIN_SAMPLES`` images on either side gets no value (not NaN), and its note says why.
    """
    b = np.array(buckets)
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    for group in (*BUCKETS, "overall"):
        members = torch.from_numpy(np.flatnonzero(np.ones(len(b), bool) if group == "overall" else b == group))
        if len(members) == 0:
            continue
        r = real_features[torch.isin(real_ids, members)]
        g = gen_features[torch.isin(gen_ids, members)]
        counts = f"{len(g)} generated vs {len(r)} real images"
        if min(len(r), len(g)) < FRECHET_MIN_SAMPLES:
            notes[f"{name}.{group}"] = f"left out: {counts}, fewer than FRECHET_MIN_SAMPLES={FRECHET_MIN_SAMPLES}"
            continue
        metrics[f"{group}/{name}"] = frechet_distance(g, r)
        notes[f"{name}.{group}"] = counts
    return metrics, notes


def _gate_metric_note(counts: np.ndarray, n: np.ndarray, buckets: list[str]) -> str:
    """What the promotion gate's default metric, few/grecall (raw gRecall), means on this data."""
    few = [i for i, b in enumerate(buckets) if b == "few"]
    capped = [i for i in few if n[i] < counts[i]]
    head = ("the promotion gate's default metric few/grecall is raw gRecall = |covered_i| / |T_i|, "
            "capped at N_i / |T_i| where N_i < |T_i| (grecall_norm divides by min(N_i, |T_i|) instead)")
    if not few:
        return f"{head}; this data has no few bucket"
    if capped:
        return (f"{head}; {len(capped)} of {len(few)} few individuals have N_i < |T_i|, so raw few/grecall "
                "is capped there: raise max_images_per_individual or gate on few/grecall_norm")
    return f"{head}; every few individual has N_i >= |T_i|, so there raw == normalised"


def evaluate(pipe: ImageGenerator, real: RealSet, cfg: EvaluateConfig, judge: Judge | None = None) -> EvalResult:
    """Generate N_i images per individual and compute the metrics of DESIGN §6 per individual and bucket.

    N_i = max(N_min, min(|T_i|, N_max)) (``images_per_individual``), prompted with captions of the
    individual's own training images (``draw_sources``), so generated images are asked for the same
    attributes as real ones. One ``generate`` call over the flat prompt list, individual-major.
    Buckets by |T_i|. Per bucket and overall (macro mean over individuals, except the Fréchet
    distance, which pools the bucket's images): ``grecall``, ``grecall_norm`` (``metrics.grecall_normalised``),
    ``accuracy`` (share passing the gate: ``judge``'s verdict when ``cfg.gate`` is ``judge`` and a
    judge is given that can judge this data, else the nearest-individual test), ``nearest_accuracy``
    (always the nearest-individual test), ``similarity`` and ``frechet_<feature>`` (``glossary.frechet_metric``),
    and overall ``separability``. Every metric is defined in ``pogdiff.glossary``. Same inputs and seed give the
    same numbers and images.
    """
    counts = real.counts
    n = images_per_individual(counts, cfg)
    sources = [draw_sources(np.flatnonzero(real.group == i), int(n[i]), cfg.seed, i) for i in range(len(real.names))]
    flat = np.concatenate(sources)
    prompts = [real.captions[r] for r in flat]
    samples = pipe.generate(
        prompts,
        num_images_per_prompt=1,
        seed=cfg.seed,
        guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.num_inference_steps,
        batch_size=cfg.batch_size,
    )
    if len(samples) != len(prompts):
        raise ValueError(f"the pipeline returned {len(samples)} images for {len(prompts)} prompts")
    c = len(real.names)
    gen_ids = torch.arange(c).repeat_interleave(torch.from_numpy(n))
    extractor = make_extractor(cfg.feature_extractor, cfg.feature_size, cfg.feature_model)
    real_f, gen_f = extractor(real.images), extractor(samples)
    real_t = torch.as_tensor(real.group, dtype=torch.long)

    wanted = [real.names[i] for i in gen_ids.tolist()]
    judged = judge(samples, wanted) if cfg.gate == "judge" and judge is not None else None
    gate = "judge" if judged is not None else "nearest"
    nearest = nearest_group(real_f, real_t, gen_f)
    nearest_ok = nearest == gen_ids
    if judged is not None:
        ok = torch.tensor([j == w for j, w in zip(judged, wanted)], dtype=torch.bool)
        index = {name: i for i, name in enumerate(real.names)}
        shown = np.array([-1 if j is None else index.get(j, -1) for j in judged])
    else:
        ok, shown = nearest_ok, nearest.numpy()
    raw = grecall(real_f, real_t, gen_f, gen_ids, c, gen_ok=ok)
    per_individual = {
        "grecall": raw,
        "grecall_norm": grecall_normalised(raw, counts, n),
        "accuracy": per_group_mean(ok.float(), gen_ids, c),
        "nearest_accuracy": per_group_mean(nearest_ok.float(), gen_ids, c),
        "similarity": feature_similarity(real_f, real_t, gen_f, gen_ids, c),
    }
    buckets = assign_buckets(counts, cfg.buckets.many_above, cfg.buckets.few_below)
    rows = [
        {"individual": name, "count": int(counts[i]), "bucket": buckets[i], "images": int(n[i]),
         "distinct_captions": len({real.captions[r] for r in np.flatnonzero(real.group == i)}),
         **{k: None if np.isnan(v[i]) else float(v[i]) for k, v in per_individual.items()}}
        for i, name in enumerate(real.names)
    ]
    frechet = frechet_metric(cfg.feature_extractor, cfg.feature_size)
    distances, frechet_notes = bucket_frechet(real_f, real_t, gen_f, gen_ids, buckets, frechet)
    info: dict[str, str | int | float] = {
        "grouped_by": real.grouped_by,
        "individuals": c,
        "gate": gate,
        "gate_metric_note": _gate_metric_note(counts, n, buckets),
        "feature_extractor": extractor.name,
        "min_images_per_individual": cfg.min_images_per_individual,
        "max_images_per_individual": cfg.max_images_per_individual,
        "generated_images": len(prompts),
        "seed": cfg.seed,
        "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps,
        "frechet_min_samples": FRECHET_MIN_SAMPLES,
        **frechet_notes,
    }
    metrics = {**bucket_means(per_individual, buckets), **distances, "overall/separability": separability(gen_ids.numpy(), shown)}
    edges = np.concatenate([[0], np.cumsum(n)]).tolist()
    spans = list(zip(edges[:-1], edges[1:]))
    return EvalResult(metrics, rows, [samples[a:b] for a, b in spans], [prompts[a:b] for a, b in spans], sources, info)

