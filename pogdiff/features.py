"""Image feature extractors for psi's image similarity and for the evaluation metrics.

The offline default works on pixels: an area-downsampled copy of the image, centred per image and
L2-normalised. It is sensitive to what the demo's individuals vary in (position, scale, rotation,
background), needs no weights, and is exactly reproducible. DINOv2 / CLIP vision extractors for
real photos plug in behind the same ``__call__``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> L2-normalised float32 ``[N, F]``."""


class PixelFeatures:
    """f(x) = normalise(flatten(avgpool_s(x)) - mean), with avgpool_s resizing to ``size x size``."""

    def __init__(self, size: int = 16):
        self.size = size
        self.name = f"pixels{size}"

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = F.adaptive_avg_pool2d(x, self.size).flatten(1)
        x = x - x.mean(1, keepdim=True)
        return F.normalize(x, dim=1)


def make_extractor(name: str, size: int) -> FeatureExtractor:
    if name == "pixels":
        return PixelFeatures(size)
    raise ValueError(f"unknown feature extractor {name!r}; available: 'pixels'")
