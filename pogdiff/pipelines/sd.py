"""Stable Diffusion (latent space): a diffusers-format folder or hub id, behind ``TextToImagePipeline``.

The standard layout written by diffusers' ``StableDiffusionPipeline.save_pretrained``::

    model_index.json   {"vae": ["diffusers", "AutoencoderKL"], "text_encoder": [..., "CLIPTextModel"], ...}
    vae/ text_encoder/ tokenizer/ unet/ scheduler/

z0 = (E(x).mean - shift) * s for the VAE encoder E, scaling factor s (0.18215 for SD 1.x) and shift
(0 unless the VAE config sets ``shift_factor``); a sample of the posterior is z0 + s * std * n.
The CLIP hidden states of captions padded to the tokenizer's length condition the UNet without an
attention mask, as Stable Diffusion was trained. Safety checker and feature extractor are not loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pogdiff.atomic import write_folder_atomic
from pogdiff.neighbours import normalised_feature
from pogdiff.pipelines.base import FORMAT_VERSION, META_FILE, Sampler, to_tensor
from pogdiff.pipelines.sampling import guided_sample


def is_sd_folder(path: Path) -> bool:
    """A local folder in the Stable Diffusion layout: ``model_index.json`` that names a ``vae``."""
    index = Path(path) / "model_index.json"
    return index.is_file() and "vae" in json.loads(index.read_text())


class StableDiffusionPipeline:
    """VAE + CLIP text encoder + tokenizer + UNet + scheduler; ``TextToImagePipeline`` in latent space.

    ``scheduler`` is a ``DDPMScheduler`` built from the folder's scheduler config (as the diffusers
    text-to-image example trains); the folder's own scheduler class is written back on save.
    """

    space = "latent"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        scheduler_class: str = "DDPMScheduler",
    ):
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"unet cross_attention_dim {unet.config.cross_attention_dim} != text encoder hidden size {text_encoder.config.hidden_size}"
            )
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"unet in_channels {unet.config.in_channels} != vae latent_channels {vae.config.latent_channels}")
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self.scheduler_class = scheduler_class
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * self.vae_scale_factor

    @classmethod
    def from_pretrained(cls, ref: str | Path) -> "StableDiffusionPipeline":
        """Load from a local folder or a hub id (from the local cache while HF_HUB_OFFLINE=1)."""
        ref = str(ref)
        try:
            index = diffusers.DiffusionPipeline.load_config(ref)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"no Stable Diffusion model at {ref!r} (local folder or cached hub id): {err}") from None
        missing = [k for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if k not in index]
        if missing:
            raise ValueError(f"{ref}: model_index.json lacks {missing}; not a Stable Diffusion layout")
        sched_cfg = DDPMScheduler.load_config(ref, subfolder="scheduler")
        return cls(
            AutoencoderKL.from_pretrained(ref, subfolder="vae"),
            CLIPTextModel.from_pretrained(ref, subfolder="text_encoder"),
            CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer"),
            UNet2DConditionModel.from_pretrained(ref, subfolder="unet"),
            DDPMScheduler.from_config(sched_cfg),
            sched_cfg.get("_class_name", "DDPMScheduler"),
        )

    def save_pretrained(self, path: Path, extra: dict | None = None) -> None:
        """Write the standard layout atomically (loadable by diffusers' own ``StableDiffusionPipeline``).

        ``extra`` (training metadata) goes to ``pogdiff.json``; diffusers ignores that file.
        """

        def write(tmp: Path) -> None:
            self.unet.save_pretrained(tmp / "unet")
            self.vae.save_pretrained(tmp / "vae")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            # from_config keeps the other class's keys as hidden config, so the round trip is lossless
            getattr(diffusers, self.scheduler_class).from_config(self.scheduler.config).save_pretrained(tmp / "scheduler")
            index = {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "scheduler": ["diffusers", self.scheduler_class],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            meta = {"format": FORMAT_VERSION, "space": "latent", "image_size": self.image_size, **(extra or {})}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

        write_folder_atomic(path, write)

    def to(self, device: torch.device | str) -> "StableDiffusionPipeline":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @torch.no_grad()
    def encode_captions(self, captions: list[str], batch_size: int = 64) -> tuple[torch.Tensor, None]:
        """CLIP last hidden states ``[N, model_max_length, D]`` (float32, CPU); no mask (SD convention)."""
        device = self.text_encoder.device
        n_tok = self.tokenizer.model_max_length
        out = []
        for start in range(0, len(captions), batch_size):
            ids = self.tokenizer(
                captions[start : start + batch_size], padding="max_length", max_length=n_tok, truncation=True, return_tensors="pt"
            ).input_ids
            out.append(self.text_encoder(ids.to(device))[0].float().cpu())
        if not out:
            return torch.zeros(0, n_tok, self.text_encoder.config.hidden_size), None
        return torch.cat(out), None

    def _shift_scale(self) -> tuple[float, float]:
        return float(self.vae.config.get("shift_factor") or 0.0), float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """images ``[N, 3, H, W]`` in [-1, 1] -> scaled VAE posterior mean and std, each ``[N, C, H/f, W/f]`` (CPU).

        Run once before training, in no-grad batches; psi's image feature is ``normalised_feature(mean)``.
        """
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, this model works on {self.image_size}x{self.image_size}")
        device, dtype = self.vae.device, self.vae.dtype
        shift, scale = self._shift_scale()
        means, stds = [], []
        for start in range(0, images.shape[0], batch_size):
            dist = self.vae.encode(images[start : start + batch_size].to(device, dtype)).latent_dist
            means.append(((dist.mean.float() - shift) * scale).cpu())
            stds.append((dist.std.float() * scale).cpu())
        return torch.cat(means), torch.cat(stds)

    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> ``normalised_feature`` of the scaled VAE latent mean ``[N, C*h*w]``."""
        return normalised_feature(self.encode_images(to_tensor(images))[0])

    def _decode(self, z0: torch.Tensor) -> torch.Tensor:
        shift, scale = self._shift_scale()
        return self.vae.decode((z0 / scale + shift).to(self.vae.dtype)).sample.float()

    def generate(
        self,
        prompts: list[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 25,
        batch_size: int = 16,
        sampler: Sampler = "ddim",
    ) -> np.ndarray:
        """Sample latents with classifier-free guidance (``guided_sample``), decode with the VAE.

        Returns uint8 ``[len(prompts) * num_images_per_prompt, H, W, 3]``, prompt-major order.
        """
        c = self.unet.config.in_channels
        h = int(self.unet.config.sample_size)
        return guided_sample(
            self.unet, self.scheduler.config, prompts, num_images_per_prompt, self.encode_captions, (c, h, h),
            self._decode, seed, guidance_scale, num_inference_steps, batch_size, sampler, self.image_size,
        )
