"""The interface every text-to-image pipeline implements, and the helpers both kinds share.

``TextToImagePipeline`` is what the trainer, the train task and the evaluation use; the pixel
(``pogdiff.pipelines.pixel``) and latent (``pogdiff.pipelines.sd``) kinds implement it. The image
conversions (uint8 <-> [-1, 1] tensors) and psi's image feature of z0 are the same for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

META_FILE = "pogdiff.json"  # a saved model folder's own metadata (format, kind, training extras)
FORMAT_VERSION = 1  # "format" in a saved model's META_FILE
ADAPTER_DIR = "lora"  # a LoRA adapter: beside the fused model in a run folder, inside an adapter-only model artifact
Sampler = Literal["ddim", "dpm"]  # DDIM, or DPM-Solver++ (2nd order multistep): fewer steps for the same quality


class TextToImagePipeline(Protocol):
    """What the trainer, the train task and the evaluation use; both pipeline kinds implement it.

    ``scheduler`` is the training noise scheduler (``add_noise``, ``get_velocity``, ``alphas_cumprod``);
    ``image_size`` is the pixel side of the images it is trained on and generates.
    """

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    image_size: int

    def to(self, device: torch.device | str) -> "TextToImagePipeline": ...

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditioning hidden states ``[N, L, D]`` (float32, CPU) and attention mask ``[N, L]`` (bool) or None."""

    def encode_images(self, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images ``[N, 3, H, W]`` in [-1, 1] -> z0 mean ``[N, C, h, w]`` and its std (None: deterministic), CPU."""

    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> L2-normalised z0 features ``[N, F]`` (``normalised_feature`` of the mean)."""

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
        """uint8 ``[len(prompts) * num_images_per_prompt, H, W, 3]``, prompt-major order."""

    def save_pretrained(self, path: Path, extra: dict | None = None) -> None: ...


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
