"""Pixel-space pipeline (the embedded default): the UNet works on the images themselves.

A pixel model is saved as a diffusers-style folder::

    unet/        config.json + diffusion_pytorch_model.safetensors
    scheduler/   scheduler_config.json
    pogdiff.json {"format": 1, "text_encoder": ..., "max_tokens": ..., "image_size": ..., "space": "pixel"}

The embedded default (``builtin:logos16``) is a small pixel-space UNet on 16x16 RGB images,
conditioned on all-MiniLM-L6-v2 hidden states; it ships inside the package (``pogdiff/assets``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pogdiff.atomic import write_folder_atomic
from pogdiff.neighbours import normalised_feature
from pogdiff.pipelines.base import FORMAT_VERSION, META_FILE, Sampler, to_tensor
from pogdiff.pipelines.sampling import guided_sample
from pogdiff.text import BUILTIN_MINILM, TextEncoder, load_text_encoder

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODELS = {"builtin:logos16": ASSETS / "logos16"}


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of a pixel-space conditional UNet (cross-attention on the lower resolutions)."""

    image_size: int = 16  # the defaults are the embedded base's (builtin:logos16)
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 384

    def build(self, seed: int = 0) -> UNet2DConditionModel:
        n = len(self.block_out_channels)
        # Attention at full resolution costs most of the step on CPU and buys little for small images.
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=self.image_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
        )


def default_scheduler() -> DDPMScheduler:
    """Cosine schedule with v-prediction (Salimans & Ho 2022).

    The linear SD schedule leaves too much signal at t=T for 16-32 pixel images; with epsilon prediction
    the near-pure-noise steps decide each image's mean colour from x0 = (x_t - sqrt(1-abar) eps) /
    sqrt(abar), which explodes as abar -> 0, so deterministic samplers drift in colour and keep
    residual noise. v-prediction keeps the x0 estimate well conditioned at every t.
    """
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def resolve_model_path(name: str) -> Path:
    """``builtin:<name>`` or a local folder; a clear error when neither exists."""
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name]
    elif name.startswith("builtin:"):
        raise FileNotFoundError(f"unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    else:
        path = Path(name)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"model folder not found or incomplete (no {META_FILE}): {path}")
    return path


class PixelDiffusionPipeline:
    """Pixel-space UNet + scheduler + text encoder (the embedded default); ``TextToImagePipeline``."""

    space = "pixel"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        text_encoder: TextEncoder,
        image_size: int,
    ):
        self.unet = unet
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.image_size = image_size

    @classmethod
    def new(cls, spec: UNetSpec, seed: int = 0, text_encoder: str = BUILTIN_MINILM, max_tokens: int = 16):
        """A randomly initialised model (for pretraining a base, or for tests)."""
        enc = load_text_encoder(text_encoder, max_tokens)
        if enc.dim != spec.cross_attention_dim:
            raise ValueError(f"cross_attention_dim {spec.cross_attention_dim} != text encoder width {enc.dim}")
        return cls(spec.build(seed), default_scheduler(), enc, spec.image_size)

    @classmethod
    def from_pretrained(cls, name: str) -> "PixelDiffusionPipeline":
        path = resolve_model_path(name)
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported model format {meta.get('format')!r}")
        if meta.get("space", "pixel") != "pixel":
            raise ValueError(f"{path} is a {meta['space']}-space model; load it with pogdiff.pipelines.loader.load_pipeline")
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        enc = load_text_encoder(meta["text_encoder"], int(meta["max_tokens"]))
        return cls(unet, scheduler, enc, int(meta["image_size"]))

    def save_pretrained(self, path: Path, extra: dict | None = None) -> None:
        """Write atomically: a crash never leaves a half-written model folder at ``path``."""

        def write(tmp: Path) -> None:
            self.unet.save_pretrained(tmp / "unet")
            self.scheduler.save_pretrained(tmp / "scheduler")
            meta = {
                "format": FORMAT_VERSION,
                "space": "pixel",
                "text_encoder": self.text_encoder.name,
                "max_tokens": self.text_encoder.max_tokens,
                "image_size": self.image_size,
                **(extra or {}),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

        write_folder_atomic(path, write)

    def to(self, device: torch.device | str) -> "PixelDiffusionPipeline":
        # The text encoder is a shared cached instance (``load_text_encoder``) and stays where it is.
        self.unet.to(device)
        return self

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniLM hidden states ``[N, max_tokens, 384]`` and attention mask ``[N, max_tokens]``."""
        return self.text_encoder.encode(captions)

    def encode_images(self, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, None]:
        """Pixel space: z0 = x itself ``[N, 3, H, W]``, no encoder noise."""
        return images, None

    def image_features(self, images: np.ndarray) -> torch.Tensor:
        return normalised_feature(to_tensor(images))

    def generate(
        self,
        prompts: list[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 25,
        batch_size: int = 128,
        sampler: Sampler = "ddim",
    ) -> np.ndarray:
        """Sample images with classifier-free guidance (``guided_sample``).

        Returns uint8 ``[len(prompts) * num_images_per_prompt, H, W, 3]``, prompt-major order.
        The noise of image j of prompt p depends only on (seed, p's position, j), so results do not
        change with ``batch_size``.
        """
        s = self.image_size
        return guided_sample(
            self.unet, self.scheduler.config, prompts, num_images_per_prompt, self.encode_captions, (3, s, s),
            lambda x: x, seed, guidance_scale, num_inference_steps, batch_size, sampler, s,
        )
