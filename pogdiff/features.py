"""Image feature extractors for psi's image similarity and for the evaluation metrics.

The offline default works on pixels: an area-downsampled copy of the image, centred per image and
L2-normalised. It is sensitive to what the demo's individuals vary in (position, scale, rotation,
background), needs no weights, and is exactly reproducible. For real photos, DINOv2 and CLIP vision
models (through transformers, from a local folder or a hub id already in the local cache) plug in
behind the same ``__call__``.
"""

from __future__ import annotations

from typing import Literal, Protocol

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


# transformers model_type values each extractor accepts; CLIPVisionModelWithProjection also loads
# the vision tower (and projection) out of a full CLIP checkpoint.
_MODEL_TYPES = {"dinov2": ("dinov2",), "clip": ("clip", "clip_vision_model")}


class VisionModelFeatures:
    """f(x) = normalise(embed(processor(x))) with a transformers vision model.

    dinov2: ``Dinov2Model`` pooler output (the layer-normed CLS token, the DINO-score feature);
    clip: ``CLIPVisionModelWithProjection`` ``image_embeds`` (the CLIP-score feature). The image
    processor saved with the model resizes and normalises. ``model`` is a local folder or a hub id;
    nothing is downloaded (a hub id must already be in the local cache).
    """

    def __init__(self, kind: Literal["dinov2", "clip"], model: str, batch_size: int = 64, device: str | None = None):
        from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModelWithProjection, Dinov2Model

        try:
            config = AutoConfig.from_pretrained(model, local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(
                f"feature model {model!r} not found: give a local folder or a hub id in the local cache ({err})"
            ) from None
        if config.model_type not in _MODEL_TYPES[kind]:
            raise ValueError(f"feature model {model!r} is a {config.model_type!r} model, not a {kind} model")
        cls = Dinov2Model if kind == "dinov2" else CLIPVisionModelWithProjection
        self.processor = AutoImageProcessor.from_pretrained(model, local_files_only=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = cls.from_pretrained(model, local_files_only=True).to(self.device).eval()
        self.kind, self.batch_size = kind, batch_size
        self.dim = int(config.hidden_size if kind == "dinov2" else config.projection_dim)
        self.name = f"{kind}:{model}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            result = self.model(pixel_values=batch["pixel_values"].to(self.device))
            f = result.pooler_output if self.kind == "dinov2" else result.image_embeds
            out.append(F.normalize(f.float(), dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def make_extractor(name: str, size: int = 16, model: str | None = None, batch_size: int = 64) -> FeatureExtractor:
    """``pixels`` (offline; ``size`` = side of the downsampled image) or ``dinov2`` / ``clip`` (``model`` needed)."""
    if name == "pixels":
        return PixelFeatures(size)
    if name in _MODEL_TYPES:
        if not model:
            raise ValueError(f"feature extractor {name!r} needs a model: a local folder or a cached hub id")
        return VisionModelFeatures(name, model, batch_size)  # type: ignore[arg-type]
    raise ValueError(f"unknown feature extractor {name!r}; available: 'pixels', 'dinov2', 'clip'")
