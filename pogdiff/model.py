"""Text-to-image pipelines: a diffusers ``UNet2DConditionModel`` + noise scheduler + frozen text encoder.

Two kinds share one interface (``TextToImagePipeline``), so the trainer, the train task and the
evaluation never care which one they hold; ``load_pipeline(ref)`` picks the kind from the folder:

* pixel space (this module, ``PixelDiffusionPipeline``): the UNet works on the images themselves;
* latent space (``pogdiff/sd.py``, ``StableDiffusionPipeline``): a Stable-Diffusion-format folder
  (``model_index.json`` with a VAE), the UNet works on VAE latents.

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
from typing import Callable, Literal, Protocol

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

from pogdiff.atomic import write_folder_atomic
from pogdiff.text import BUILTIN_MINILM, TextEncoder, load_text_encoder

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = {"builtin:logos16": ASSETS / "logos16"}
FORMAT_VERSION = 1
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
        """uint8 ``[N, H, W, 3]`` -> L2-normalised z0 features ``[N, F]`` (``latent_features`` of the mean)."""

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
    if not (path / "pogdiff.json").is_file():
        raise FileNotFoundError(f"model folder not found or incomplete (no pogdiff.json): {path}")
    return path


def load_pipeline(ref: str) -> TextToImagePipeline:
    """Load either kind by its layout: ``model_index.json`` naming a ``vae`` -> Stable Diffusion (latent);
    ``builtin:<name>`` or a folder with a pixel ``pogdiff.json`` -> pixel. ``ref`` that is not a local
    path is taken as a hub id (read from the local cache: HF_HUB_OFFLINE)."""
    from pogdiff import sd  # sd builds on this module's helpers, so it is imported here, not at the top

    if ref.startswith("builtin:"):
        return PixelDiffusionPipeline.from_pretrained(ref)
    path = Path(ref)
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model reference is a file, not a model folder: {path}")
        if sd.is_sd_folder(path):
            return sd.StableDiffusionPipeline.from_pretrained(ref)
        if (path / "pogdiff.json").is_file():
            return PixelDiffusionPipeline.from_pretrained(ref)
        raise FileNotFoundError(f"{path} is neither a Stable Diffusion folder (model_index.json with a vae) nor a pogdiff pixel model (pogdiff.json)")
    return sd.StableDiffusionPipeline.from_pretrained(ref)


def latent_features(z0: torch.Tensor) -> torch.Tensor:
    """psi's image feature from z0 ``[N, C, h, w]``: f = normalise(flatten(z0) - mean), ``[N, C*h*w]``.

    For Stable Diffusion z0 is the scaled VAE latent mean (DESIGN §4); for a pixel model, the pixels.
    """
    flat = z0.float().flatten(1)
    return torch.nn.functional.normalize(flat - flat.mean(1, keepdim=True), dim=1)


def initial_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``[count, *shape]``; row n depends only on (seed, n), so samples never change with the batch size."""
    noise = torch.empty(count, *shape)
    for n in range(count):
        g = torch.Generator().manual_seed(seed * 1_000_003 + n)
        noise[n] = torch.randn(*shape, generator=g)
    return noise


@torch.no_grad()
def guided_sample(
    unet: UNet2DConditionModel,
    scheduler_config,
    prompts: list[str],
    num_images_per_prompt: int,
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
    noise_shape: tuple[int, ...],
    decode: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int,
    sampler: Sampler,
    image_size: int,
) -> np.ndarray:
    """The one sampling loop of both pipeline kinds: DDIM or DPM-Solver++ with classifier-free guidance.

    f_hat = f(x_t, "") + g * (f(x_t, y) - f(x_t, ""))   (f = the model output, eps or v)

    ``encode`` maps captions to (hidden ``[N, L, D]``, mask ``[N, L]`` or None); ``decode`` maps the
    final x_0 ``[b, *noise_shape]`` to images ``[b, 3, H, W]`` in [-1, 1]. Returns uint8
    ``[len(prompts) * num_images_per_prompt, H, W, 3]``, prompt-major order.
    """
    unet.eval()
    device = next(unet.parameters()).device
    all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    uniq = sorted(set(all_prompts))
    hidden, mask = encode(uniq + [""])
    row = {p: i for i, p in enumerate(uniq)}
    null_h = hidden[-1:]
    null_m = mask[-1:] if mask is not None else None
    sched_cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[sampler]
    sched = sched_cls.from_config(scheduler_config)
    noise = initial_noise(len(all_prompts), noise_shape, seed) * sched.init_noise_sigma
    out = []
    for start in range(0, len(all_prompts), batch_size):
        sched.set_timesteps(num_inference_steps)  # also resets a multistep solver's history
        idx = torch.tensor([row[p] for p in all_prompts[start : start + batch_size]])
        x = noise[start : start + batch_size].to(device)
        b = len(idx)
        guided = guidance_scale != 1.0  # at 1 the unconditional branch cancels out: skip it
        if guided:
            h = torch.cat([null_h.expand(b, -1, -1), hidden[idx]]).to(device)
            m = torch.cat([null_m.expand(b, -1), mask[idx]]).to(device) if mask is not None else None
        else:
            h = hidden[idx].to(device)
            m = mask[idx].to(device) if mask is not None else None
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
            pred = unet(x_in, t, h, encoder_attention_mask=m).sample
            if guided:
                e_null, e_cond = pred.chunk(2)
                pred = e_null + guidance_scale * (e_cond - e_null)
            x = sched.step(pred, t, x).prev_sample
        out.append(to_uint8(decode(x).cpu()))
    return np.concatenate(out) if out else np.zeros((0, image_size, image_size, 3), np.uint8)


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
        meta = json.loads((path / "pogdiff.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported model format {meta.get('format')!r}")
        if meta.get("space", "pixel") != "pixel":
            raise ValueError(f"{path} is a {meta['space']}-space model; load it with pogdiff.model.load_pipeline")
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
            (tmp / "pogdiff.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

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
        return latent_features(to_tensor(images))

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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
