"""The evaluate stage as one library call: generate images per individual, score them per bucket.

The unit of the long tail is the *individual* (a product, a person), not the caption: a catalogue
describes every image of an individual in its own words, so captions are nearly unique while the
individual recurs. Counts, buckets, gRecall, accuracy and the grids are therefore per individual;
data without an individual column fall back to one individual per distinct caption.

Prompting only with training captions rewards copying: a model that reproduces its training photos
scores full marks. Held-out photos (never trained on) are the other half of the evaluation: their
captions ask for an individual in attributes it was never photographed in, and the held-out metrics
say whether the images show it, show what was asked, or reproduce a training photo instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pogdiff.config import EvaluateConfig
from pogdiff.features import FeatureExtractor, make_extractor
from pogdiff.glossary import frechet_metric
from pogdiff.metrics import (
    COPY_QUANTILE,
    FRECHET_MIN_SAMPLES,
    Attributes,
    assign_buckets,
    bucket_frechet,
    bucket_means,
    copies_by_attributes,
    copy_threshold,
    faithful,
    feature_similarity,
    grecall,
    grecall_normalised,
    nearest_group,
    own_nearest_similarity,
    per_group_mean,
    separability,
)
from pogdiff.realset import RealSet

# Added to cfg.seed for the held-out prompts' images, so their noise is not that of the images
# generated for training captions (the pipelines seed image n from (seed, n)).
HOLDOUT_SEED_OFFSET = 7919


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


class AttributeReader(Protocol):
    """What an image shows, read off it (e.g. ``pogdiff.demo.detector.attributes`` on demo data:
    ``(size word, position phrase, background)``).

    Given uint8 ``[N, H, W, 3]`` images, returns per image a tuple of attribute values, comparable
    with ``==`` across images, or None where the image cannot be read.
    """

    def __call__(self, images: np.ndarray) -> list[Attributes | None]: ...


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
    count = |T_i|, bucket, images = N_i, distinct_captions, then each metric or None; with held-out
    photos also holdout_count = |H_i|, holdout_images = M_i and the held-out metrics); samples[i]:
    uint8 ``[N_i, H, W, 3]``; prompts[i]: the N_i captions they were generated from; sources[i]: int
    ``[N_i]``, the real image (row of ``RealSet.images``) whose caption prompted sample j. info: what
    the numbers were computed from (grouping, gate, extractor, N, seed, copy test, ...) and, per
    bucket, the image counts behind its Fréchet distance or why it was left out.

    The held-out prompts' images, empty lists without held-out photos, else one entry per
    individual as above (empty where it has no held-out photo): holdout_samples[i] uint8
    ``[M_i, H, W, 3]``, holdout_prompts[i] their M_i captions, holdout_sources[i] int ``[M_i]``, the
    held-out photo (row of the held-out ``RealSet.images``) whose caption prompted image j.
    """

    metrics: dict[str, float]
    per_individual: list[dict]
    samples: list[np.ndarray]
    prompts: list[list[str]]
    sources: list[np.ndarray]
    info: dict[str, str | int | float] = field(default_factory=dict)
    holdout_samples: list[np.ndarray] = field(default_factory=list)
    holdout_prompts: list[list[str]] = field(default_factory=list)
    holdout_sources: list[np.ndarray] = field(default_factory=list)


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


def evaluate(pipe: ImageGenerator, real: RealSet, cfg: EvaluateConfig, judge: Judge | None = None,
             holdout: RealSet | None = None, attributes: AttributeReader | None = None) -> EvalResult:
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

    ``holdout``: held-out photos (never trained on), grouped under the same individual names as
    ``real`` (each of its individuals must be one of ``real``'s). Each individual i with |H_i|
    held-out photos also gets M_i = max(N_min, |H_i|) images prompted with its held-out captions
    (``draw_sources`` over H_i, seeded with cfg.seed + ``HOLDOUT_SEED_OFFSET``), in one more
    ``generate`` call, scored per bucket (still by |T_i|) and overall as macro means over the
    individuals with held-out photos: ``holdout_accuracy``, ``holdout_grecall``, ``copy_rate`` and,
    with an ``attributes`` reader, ``prompt_fidelity`` (``_held_out``). Without ``holdout`` nothing
    changes: the same images, numbers and keys.
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
    result = EvalResult(metrics, rows, _spans(samples, n), _spans(prompts, n), sources, info)
    if holdout is None:
        return result
    held = _held_out(pipe, real, holdout, cfg, judge, attributes, extractor, real_f, real_t)
    for i, row in enumerate(rows):
        row |= {"holdout_count": int(held.counts[i]), "holdout_images": int(held.n[i]),
                **{k: None if np.isnan(v[i]) else float(v[i]) for k, v in held.per_individual.items()}}
    result.metrics |= bucket_means(held.per_individual, buckets)
    result.info |= held.info
    result.holdout_samples, result.holdout_prompts = _spans(held.samples, held.n), _spans(held.prompts, held.n)
    result.holdout_sources = held.sources
    return result


def _spans(flat, n: np.ndarray) -> list:
    """``flat`` (individual-major, n[i] items of individual i) cut into one slice per individual."""
    edges = np.concatenate([[0], np.cumsum(n)]).astype(int).tolist()
    return [flat[a:b] for a, b in zip(edges[:-1], edges[1:])]


@dataclass(frozen=True)
class _HeldOut:
    """The held-out half of an evaluation: counts = |H_i| ``[C]``; n = M_i ``[C]``; per_individual:
    metric -> ``[C]`` (NaN without held-out photos); samples uint8 ``[sum M_i, H, W, 3]`` and prompts
    individual-major; sources[i] ``[M_i]`` rows of the held-out images; info."""

    counts: np.ndarray
    n: np.ndarray
    per_individual: dict[str, np.ndarray]
    samples: np.ndarray
    prompts: list[str]
    sources: list[np.ndarray]
    info: dict[str, str | int | float]


def _held_out(pipe: ImageGenerator, real: RealSet, holdout: RealSet, cfg: EvaluateConfig, judge: Judge | None,
              attributes: AttributeReader | None, extractor: FeatureExtractor, real_f: torch.Tensor, real_t: torch.Tensor) -> _HeldOut:
    """Generate from the held-out captions and score the images (``evaluate``), per individual i:

    - holdout_accuracy_i: share of its M_i images that pass the gate (the judge, as for training
      prompts, else the nearest training image belongs to i);
    - holdout_grecall_i: gRecall with T_i = H_i: |{h in H_i : h is the nearest H_i photo of an
      accepted image}| / |H_i|;
    - prompt_fidelity_i (``attributes`` given and reading at least one held-out photo; otherwise it is
      not reported and the copy test is the feature one): share of images g with a(g) = a(h_g), h_g the held-out
      photo whose caption prompted g and a the attributes read (an unreadable g is not faithful);
    - copy_rate_i: share of images that reproduce one of its training photos instead of the prompt.
      With ``attributes``: a(g) != a(h_g) and a(g) = a(x) for a training photo x of i. Without:
      s(g) = max_{x in T_i} cos(g, x) > tau, tau the ``COPY_QUANTILE`` quantile of s(h) over all
      held-out photos h (each against its own individual's training photos), so an honest new photo
      of the individual counts as a copy 5 % of the time.
    """
    index = {name: i for i, name in enumerate(real.names)}
    unknown = [name for name in holdout.names if name not in index]
    if unknown:
        raise ValueError(f"held-out individual {unknown[0]!r} has no training images, so it has no bucket; "
                         "leave its held-out photos out")
    if holdout.grouped_by != real.grouped_by:
        raise ValueError(f"the held-out photos are grouped by {holdout.grouped_by}, the training images by {real.grouped_by}")
    if holdout.images.shape[1:] != real.images.shape[1:]:
        raise ValueError(f"held-out images are {holdout.images.shape[1:]}, training images {real.images.shape[1:]}: "
                         "decode both at the same size")
    c = len(real.names)
    group = np.array([index[holdout.names[g]] for g in holdout.group], np.int64)  # individual of each held-out photo
    counts = np.bincount(group, minlength=c)
    n = np.where(counts > 0, np.maximum(cfg.min_images_per_individual, counts), 0)
    seed = cfg.seed + HOLDOUT_SEED_OFFSET
    sources = [draw_sources(np.flatnonzero(group == i), int(n[i]), seed, i) if n[i] else np.zeros(0, np.int64)
               for i in range(c)]
    flat = np.concatenate(sources)
    prompts = [holdout.captions[r] for r in flat]
    samples = pipe.generate(prompts, num_images_per_prompt=1, seed=seed, guidance_scale=cfg.guidance_scale,
                            num_inference_steps=cfg.num_inference_steps, batch_size=cfg.batch_size)
    if len(samples) != len(prompts):
        raise ValueError(f"the pipeline returned {len(samples)} images for {len(prompts)} held-out prompts")
    gen_ids = torch.from_numpy(np.repeat(np.arange(c), n))
    hold_f, gen_f = extractor(holdout.images), extractor(samples)
    hold_t = torch.from_numpy(group)

    wanted = [real.names[i] for i in gen_ids.tolist()]
    judged = judge(samples, wanted) if cfg.gate == "judge" and judge is not None else None
    if judged is not None:
        ok = torch.tensor([j == w for j, w in zip(judged, wanted)], dtype=torch.bool)
    else:
        ok = nearest_group(real_f, real_t, gen_f) == gen_ids
    per_individual = {
        "holdout_accuracy": per_group_mean(ok.float(), gen_ids, c),
        "holdout_grecall": grecall(hold_f, hold_t, gen_f, gen_ids, c, gen_ok=ok),
    }
    info: dict[str, str | int | float] = {
        "holdout_individuals": int((counts > 0).sum()),
        "holdout_photos": len(holdout.images),
        "holdout_generated_images": len(prompts),
        "holdout_seed": seed,
        "holdout_gate": "judge" if judged is not None else "nearest",
    }
    photo_read = attributes(holdout.images) if attributes is not None else None
    if photo_read is not None and all(a is None for a in photo_read):
        # a reader that reads none of the held-out photos cannot say what their captions asked for
        # (e.g. the demo's detector on other data): no prompt fidelity, and the feature copy test
        info["attribute_reader"] = "reads none of the held-out photos: not used"
        photo_read = None
    if photo_read is not None:
        read, asked = attributes(samples), [photo_read[r] for r in flat]
        own = np.flatnonzero(counts[real.group] > 0)  # training photos of the individuals with held-out photos
        seen: list[set] = [set() for _ in range(c)]
        for r, a in zip(own, attributes(real.images[own])):
            if a is not None:
                seen[real.group[r]].add(a)
        per_individual["prompt_fidelity"] = per_group_mean(torch.from_numpy(faithful(read, asked)), gen_ids, c)
        copies = torch.from_numpy(copies_by_attributes(read, asked, [seen[i] for i in gen_ids.tolist()]))
        info |= {"copy_test": "attributes", "holdout_unreadable_photos": sum(a is None for a in photo_read),
                 "holdout_unreadable_images": sum(a is None for a in read)}
    else:
        tau = copy_threshold(hold_f, hold_t, real_f, real_t)
        copies = own_nearest_similarity(gen_f, gen_ids, real_f, real_t) > tau
        info |= {"copy_test": "feature similarity", "copy_quantile": COPY_QUANTILE, "copy_threshold": tau}
    per_individual["copy_rate"] = per_group_mean(copies.float(), gen_ids, c)
    return _HeldOut(counts, n, per_individual, samples, prompts, sources, info)

