"""The evaluate stage as one library call: generate N images per caption, score them per bucket."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pogdiff import demo
from pogdiff.config import EvaluateConfig
from pogdiff.features import make_extractor
from pogdiff.metrics import assign_buckets, bucket_means, feature_similarity, grecall, nearest_caption_gate, per_caption_mean
from pogdiff.model import PixelDiffusionPipeline


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
    """metrics: ``{"<bucket>/<metric>": value}``; per_caption: one row per caption; samples uint8 ``[C, n, H, W, 3]``."""

    metrics: dict[str, float]
    per_caption: list[dict]
    samples: np.ndarray
    info: dict[str, str | int | float] = field(default_factory=dict)


def evaluate(
    pipe: PixelDiffusionPipeline,
    captions: list[str],
    counts: np.ndarray,
    real_images: np.ndarray,
    real_ids: np.ndarray,
    cfg: EvaluateConfig,
) -> EvalResult:
    """Generate ``cfg.images_per_caption`` images per caption and compute the metrics of DESIGN §6.

    captions ``C``; counts ``[C]`` training images per caption; real_images uint8 ``[R, H, W, 3]``
    with caption ids real_ids ``[R]``. Metrics are reported per bucket and overall.
    """
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
    extractor = make_extractor(cfg.feature_extractor, cfg.feature_size)
    real_f, gen_f = extractor(real_images), extractor(samples)
    real_t = torch.as_tensor(real_ids, dtype=torch.long)

    judged = attribute_judge(samples, gen_captions) if cfg.gate == "judge" else None
    gate = "judge" if judged is not None else "nearest"
    ok = torch.from_numpy(judged) if judged is not None else nearest_caption_gate(real_f, real_t, gen_f, gen_ids)
    per_caption = {
        "grecall": grecall(real_f, real_t, gen_f, gen_ids, len(captions), gen_ok=ok),
        "accuracy": per_caption_mean(ok.float(), gen_ids, len(captions)),
        "similarity": feature_similarity(real_f, real_t, gen_f, gen_ids, len(captions)),
    }
    buckets = assign_buckets(np.asarray(counts), cfg.buckets.many_above, cfg.buckets.few_below)
    rows = [
        {"caption": c, "count": int(counts[i]), "bucket": buckets[i], **{k: float(v[i]) for k, v in per_caption.items()}}
        for i, c in enumerate(captions)
    ]
    info = {"gate": gate, "feature_extractor": extractor.name, "images_per_caption": n, "seed": cfg.seed}
    size = samples.shape[1]
    return EvalResult(bucket_means(per_caption, buckets), rows, samples.reshape(len(captions), n, size, size, 3), info)


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
