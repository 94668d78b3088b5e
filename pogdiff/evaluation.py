"""The evaluate stage as one library call: generate N images per caption, score them per bucket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pogdiff import demo
from pogdiff.config import EvaluateConfig
from pogdiff.features import make_extractor
from pogdiff.metrics import (
    BUCKETS,
    FID_MIN_SAMPLES,
    assign_buckets,
    bucket_means,
    feature_similarity,
    frechet_distance,
    grecall,
    nearest_caption_gate,
    per_caption_mean,
)


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
        """uint8 ``[len(prompts) * num_images_per_prompt, H, W, 3]``, prompt-major, seeded."""


def attribute_judge(images: np.ndarray, captions: list[str]) -> np.ndarray | None:
    """The demo's exact judge: ``[G]`` bool, detected attributes == the caption's attributes.

    None when some caption is not a demo caption (no exact judge exists for that data).
    """
    wanted = [demo.parse_caption(c) for c in captions]
    if any(w is None for w in wanted):
        return None
    found = demo.detect(images)
    return np.array([f == w for f, w in zip(found, wanted)], dtype=bool)


@dataclass
class EvalResult:
    """metrics: ``{"<bucket>/<metric>": value}``; per_caption: one row per caption; samples uint8 ``[C, n, H, W, 3]``.

    info: what the numbers were computed from (gate, extractor, N, seed, ...) and, per bucket, the
    image counts behind its FID or why the FID was left out.
    """

    metrics: dict[str, float]
    per_caption: list[dict]
    samples: np.ndarray
    info: dict[str, str | int | float] = field(default_factory=dict)


def bucket_fids(
    real_features: torch.Tensor,
    real_ids: torch.Tensor,
    gen_features: torch.Tensor,
    gen_ids: torch.Tensor,
    buckets: list[str],
) -> tuple[dict[str, float], dict[str, str]]:
    """FID per bucket and overall: generated vs real images of the bucket's captions.

    Features ``[R, F]`` / ``[G, F]`` with caption ids ``[R]`` / ``[G]``; ``buckets[c]`` is caption
    c's bucket. Returns ``({"<bucket>/fid": d2}, {"fid.<bucket>": note})``: a bucket with fewer than
    ``FID_MIN_SAMPLES`` images on either side gets no value (not NaN), and its note says why.
    """
    b = np.array(buckets)
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name in (*BUCKETS, "overall"):
        members = torch.from_numpy(np.flatnonzero(np.ones(len(b), bool) if name == "overall" else b == name))
        if len(members) == 0:
            continue
        r = real_features[torch.isin(real_ids, members)]
        g = gen_features[torch.isin(gen_ids, members)]
        counts = f"{len(g)} generated vs {len(r)} real images"
        if min(len(r), len(g)) < FID_MIN_SAMPLES:
            notes[f"fid.{name}"] = f"left out: {counts}, fewer than FID_MIN_SAMPLES={FID_MIN_SAMPLES}"
            continue
        metrics[f"{name}/fid"] = frechet_distance(g, r)
        notes[f"fid.{name}"] = counts
    return metrics, notes


def evaluate(
    pipe: ImageGenerator,
    captions: list[str],
    counts: np.ndarray,
    real_images: np.ndarray,
    real_ids: np.ndarray,
    cfg: EvaluateConfig,
) -> EvalResult:
    """Generate ``cfg.images_per_caption`` images per caption and compute the metrics of DESIGN §6.

    captions ``C``; counts ``[C]`` training images per caption; real_images uint8 ``[R, H, W, 3]``
    with caption ids real_ids ``[R]``. Per bucket and overall (macro mean over captions, except FID
    which pools the bucket's images): ``grecall``, ``accuracy`` (share passing the gate: the judge's
    verdict when it is used, else the nearest-caption test), ``nearest_accuracy`` (always the
    nearest-caption test), ``similarity`` and ``fid``. Same inputs and seed give the same numbers.
    """
    if len(captions) != len(counts):
        raise ValueError(f"{len(captions)} captions but {len(counts)} counts")
    if len(real_images) != len(real_ids):
        raise ValueError(f"{len(real_images)} real images but {len(real_ids)} caption ids")
    n = cfg.images_per_caption
    samples = pipe.generate(
        captions,
        num_images_per_prompt=n,
        seed=cfg.seed,
        guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.num_inference_steps,
        batch_size=cfg.batch_size,
    )
    gen_ids = torch.arange(len(captions)).repeat_interleave(n)
    gen_captions = [c for c in captions for _ in range(n)]
    extractor = make_extractor(cfg.feature_extractor, cfg.feature_size, cfg.feature_model)
    real_f, gen_f = extractor(real_images), extractor(samples)
    real_t = torch.as_tensor(real_ids, dtype=torch.long)

    judged = attribute_judge(samples, gen_captions) if cfg.gate == "judge" else None
    gate = "judge" if judged is not None else "nearest"
    nearest_ok = nearest_caption_gate(real_f, real_t, gen_f, gen_ids)
    ok = torch.from_numpy(judged) if judged is not None else nearest_ok
    per_caption = {
        "grecall": grecall(real_f, real_t, gen_f, gen_ids, len(captions), gen_ok=ok),
        "accuracy": per_caption_mean(ok.float(), gen_ids, len(captions)),
        "nearest_accuracy": per_caption_mean(nearest_ok.float(), gen_ids, len(captions)),
        "similarity": feature_similarity(real_f, real_t, gen_f, gen_ids, len(captions)),
    }
    buckets = assign_buckets(np.asarray(counts), cfg.buckets.many_above, cfg.buckets.few_below)
    rows = [
        {"caption": c, "count": int(counts[i]), "bucket": buckets[i],
         **{k: None if np.isnan(v[i]) else float(v[i]) for k, v in per_caption.items()}}
        for i, c in enumerate(captions)
    ]
    fids, fid_notes = bucket_fids(real_f, real_t, gen_f, gen_ids, buckets)
    info: dict[str, str | int | float] = {
        "gate": gate,
        "feature_extractor": extractor.name,
        "images_per_caption": n,
        "seed": cfg.seed,
        "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps,
        "fid_min_samples": FID_MIN_SAMPLES,
        **fid_notes,
    }
    size = samples.shape[1]
    metrics = {**bucket_means(per_caption, buckets), **fids}
    return EvalResult(metrics, rows, samples.reshape(len(captions), n, size, size, 3), info)


def comparison_grid(real: list[np.ndarray], generated: list[np.ndarray], per_row: int = 6, pad: int = 2) -> np.ndarray:
    """One row per caption: up to ``per_row`` real images, a gap, then ``per_row`` generated ones.

    real / generated: lists (one entry per caption) of uint8 ``[k, H, W, 3]``. Returns uint8 ``[Hg, Wg, 3]``.
    """
    if not generated:
        raise ValueError("comparison_grid needs at least one caption")
    s = generated[0].shape[1]
    cell = s + pad
    width = (2 * per_row) * cell + 3 * pad + cell // 2
    grid = np.full((len(generated) * cell + pad, width, 3), 255, np.uint8)
    for r, (re, ge) in enumerate(zip(real, generated)):
        y = pad + r * cell
        for j, img in enumerate(re[:per_row]):
            x = pad + j * cell
            grid[y : y + s, x : x + s] = img
        for j, img in enumerate(ge[:per_row]):
            x = pad + (per_row + j) * cell + cell // 2
            grid[y : y + s, x : x + s] = img
    return grid
