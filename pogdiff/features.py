"""Image feature extractors for psi's image similarity and for the evaluation metrics.

``pixels``: an area-downsampled copy of the image, centred per image and L2-normalised. It needs no
weights and is exactly reproducible, but it sees position and background more than identity.
``unet``: the diffusion model's own UNet on the clean image, every block's output max-pooled over
space. Every model has one, so it works offline, and it sees what the image shows rather than where
(on the demo catalogue a same-product pair is more alike than a pair of another product of the same
colour 82% of the time; pixels: 48%, chance. bench/similarity.py). For real photos, DINOv2 and CLIP vision models
(through transformers, from a local folder or a hub id already in the local cache) plug in behind
the same ``__call__``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pogdiff.neighbours import normalised_feature

if TYPE_CHECKING:
    from pogdiff.pipelines.base import TextToImagePipeline


class FeatureExtractor(Protocol):
    name: str  # identifies the feature (extractor, settings, weights): the cache key of stored features
    dim: int  # F
    input_size: int  # side at which images should be decoded for it

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> L2-normalised float32 ``[N, F]``."""


class PixelFeatures:
    """f(x) = normalise(flatten(avgpool_s(x)) - mean), with avgpool_s resizing to ``size x size``."""

    def __init__(self, size: int = 16):
        self.size = size
        self.name = f"pixels{size}"
        self.dim = 3 * size * size
        self.input_size = 4 * size  # an area average: decoding at a multiple of its size loses nothing

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return normalised_feature(F.adaptive_avg_pool2d(x, self.size))


class UNetFeatures:
    """f(x) = normalise(concat_b normalise(max_{h,w} h_b(z0, t=0, "")))  ``[N, sum_b C_b]``.

    h_b is the output of UNet block b (every down block, the mid block, every up block) for the clean
    z0 (the pixels, or the scaled VAE latent mean for Stable Diffusion) at timestep 0 under the empty
    caption. Max pooling keeps what is present anywhere in the image and drops where it is; the
    per-block normalisation keeps the wide deep blocks from outweighing the early, colour-sensitive
    ones. No noise is drawn, so the feature is a pure function of the image and the weights; ``name``
    carries a digest of the weights, so cached features are never reused across models.
    """

    def __init__(self, pipe: "TextToImagePipeline", batch_size: int = 64):
        self.pipe, self.batch_size = pipe, batch_size
        unet = pipe.unet
        digest = hashlib.sha256()
        for key, value in sorted(unet.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.name = f"unet:{digest.hexdigest()[:16]}"
        self.blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        self.dim = sum(b.resnets[-1].out_channels for b in self.blocks)
        self.input_size = pipe.image_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        from pogdiff.pipelines.base import to_tensor

        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
        unet = self.pipe.unet
        was_training = unet.training
        unet.eval()
        device = next(unet.parameters()).device
        hidden, mask = self.pipe.encode_captions([""])
        pooled: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, i, o: pooled.append((o[0] if isinstance(o, tuple) else o).amax((2, 3))))
                 for b in self.blocks]
        out = []
        try:
            for start in range(0, len(images), self.batch_size):
                z0 = self.pipe.encode_images(to_tensor(images[start : start + self.batch_size]))[0].to(device, unet.dtype)
                n = len(z0)
                pooled.clear()
                unet(z0, torch.zeros(n, dtype=torch.long, device=device), hidden.expand(n, -1, -1).to(device, unet.dtype),
                     encoder_attention_mask=None if mask is None else mask.expand(n, -1).to(device))
                out.append(F.normalize(torch.cat([F.normalize(p.float(), dim=1) for p in pooled], 1), dim=1).cpu())
        finally:
            for h in hooks:
                h.remove()
            unet.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.dim)


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
        self.input_size = 224  # the processor resizes to the model's own input

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


def make_extractor(name: str, size: int = 16, model: str | None = None, batch_size: int = 64,
                   pipe: "TextToImagePipeline | None" = None) -> FeatureExtractor:
    """``pixels`` (offline; ``size`` = side of the downsampled image), ``unet`` (``model`` = the diffusion
    model whose UNet to use: builtin name, folder or hub id) or ``dinov2`` / ``clip`` (``model`` needed).

    ``pipe``: ``model`` already loaded and not yet trained, used by ``unet`` instead of loading it again.
    """
    if name == "pixels":
        return PixelFeatures(size)
    if name == "unet":
        if not model:
            raise ValueError("feature extractor 'unet' needs the diffusion model whose UNet it uses")
        if pipe is None:
            from pogdiff.pipelines.loader import load_pipeline

            pipe = load_pipeline(model)
        return UNetFeatures(pipe, batch_size)
    if name in _MODEL_TYPES:
        if not model:
            raise ValueError(f"feature extractor {name!r} needs a model: a local folder or a cached hub id")
        return VisionModelFeatures(name, model, batch_size)  # type: ignore[arg-type]
    raise ValueError(f"unknown feature extractor {name!r}; available: 'pixels', 'unet', 'dinov2', 'clip'")
