"""Per-caption evaluation metrics and their aggregation per frequency bucket (DESIGN §6).

Captions are integer ids ``0..C-1``. Features are L2-normalised, so cosine = dot product.

gRecall (generative recall). For caption i with training images T_i and generated images G_i:
  kept_i    = {g in G_i : gate(g)}  where gate is a judge's verdict, or "the nearest real image of g
              (over all captions) belongs to i";
  covered_i = {x in T_i : x is the nearest T_i image of some g in kept_i};
  gRecall_i = |covered_i| / |T_i|.
Identity accuracy_i = share of G_i that pass the gate. Feature similarity_i = mean cos(g, x) over
G_i x T_i.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Bucket = Literal["many", "medium", "few"]
BUCKETS: tuple[Bucket, ...] = ("many", "medium", "few")


def nearest_caption_gate(real_features: torch.Tensor, real_ids: torch.Tensor, gen_features: torch.Tensor, gen_ids: torch.Tensor) -> torch.Tensor:
    """``[G]`` bool: the nearest real image of each generated image belongs to its own caption."""
    nearest = (gen_features @ real_features.T).argmax(1)
    return real_ids[nearest] == gen_ids


def grecall(
    real_features: torch.Tensor,
    real_ids: torch.Tensor,
    gen_features: torch.Tensor,
    gen_ids: torch.Tensor,
    num_captions: int,
    gen_ok: torch.Tensor | None = None,
) -> np.ndarray:
    """gRecall per caption ``[C]`` (NaN for captions without real images).

    real_features ``[R, F]``, real_ids ``[R]``, gen_features ``[G, F]``, gen_ids ``[G]``;
    gen_ok ``[G]`` bool replaces the nearest-caption gate when given (a judge's verdict).
    """
    if gen_ok is None:
        gen_ok = nearest_caption_gate(real_features, real_ids, gen_features, gen_ids)
    out = np.full(num_captions, np.nan)
    for c in range(num_captions):
        real = (real_ids == c).nonzero().squeeze(1)
        if len(real) == 0:
            continue
        kept = ((gen_ids == c) & gen_ok).nonzero().squeeze(1)
        if len(kept) == 0:
            out[c] = 0.0
            continue
        nearest = (gen_features[kept] @ real_features[real].T).argmax(1)
        out[c] = len(torch.unique(nearest)) / len(real)
    return out


def per_caption_mean(values: torch.Tensor, ids: torch.Tensor, num_captions: int) -> np.ndarray:
    """Mean of ``values`` ``[G]`` per caption id ``[G]`` -> ``[C]`` (NaN where a caption has none)."""
    out = np.full(num_captions, np.nan)
    for c in range(num_captions):
        sel = ids == c
        if sel.any():
            out[c] = values[sel].float().mean().item()
    return out


def feature_similarity(real_features, real_ids, gen_features, gen_ids, num_captions: int) -> np.ndarray:
    """Mean cosine of generated to real images of the same caption, per caption ``[C]``."""
    out = np.full(num_captions, np.nan)
    for c in range(num_captions):
        r, g = real_features[real_ids == c], gen_features[gen_ids == c]
        if len(r) and len(g):
            out[c] = (g @ r.T).mean().item()
    return out


def assign_buckets(counts: np.ndarray, many_above: int, few_below: int) -> list[Bucket]:
    """Bucket per caption from its training count: many if n > many_above, few if n < few_below."""
    return ["many" if n > many_above else "few" if n < few_below else "medium" for n in counts]


def bucket_means(per_caption: dict[str, np.ndarray], buckets: list[Bucket]) -> dict[str, float]:
    """Macro average over captions: ``{"<bucket>/<metric>": v, "overall/<metric>": v}``.

    Buckets without captions are left out rather than reported as 0.
    """
    b = np.array(buckets)
    out: dict[str, float] = {}
    for metric, values in per_caption.items():
        for name in (*BUCKETS, "overall"):
            sel = np.ones(len(b), bool) if name == "overall" else b == name
            v = values[sel]
            v = v[~np.isnan(v)]
            if len(v):
                out[f"{name}/{metric}"] = float(v.mean())
    return out
