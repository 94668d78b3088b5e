"""The text-to-image model: a diffusers ``UNet2DConditionModel`` + noise scheduler + frozen text encoder.

Saved as a diffusers-style folder::

    unet/        config.json + diffusion_pytorch_model.safetensors
    scheduler/   scheduler_config.json
    pogdiff.json {"format": 1, "text_encoder": ..., "max_tokens": ..., "image_size": ..., "space": "pixel"}

The embedded default (``builtin:shapes32``) is a small pixel-space UNet on 32x32 RGB images,
conditioned on all-MiniLM-L6-v2 hidden states; it ships inside the package (``pogdiff/assets``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from pogdiff.text import BUILTIN_MINILM, TextEncoder, load_text_encoder

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = {"builtin:shapes32": ASSETS / "shapes32"}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of a pixel-space conditional UNet (cross-attention on the lower resolutions)."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 64)
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

    The linear SD schedule leaves too much signal at t=T for 32x32 pixels; with epsilon prediction
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


class PixelDiffusionPipeline:
    """UNet + scheduler + text encoder, with ``generate`` for classifier-free-guided sampling."""

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
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        enc = load_text_encoder(meta["text_encoder"], int(meta["max_tokens"]))
        return cls(unet, scheduler, enc, int(meta["image_size"]))

    def save_pretrained(self, path: Path, extra: dict | None = None) -> None:
        """Write atomically: a crash never leaves a half-written model folder at ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp creates 0700; a model folder is meant to be shared
        try:
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
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 25,
        batch_size: int = 128,
    ) -> np.ndarray:
        """Sample images with DDIM and classifier-free guidance.

        f_hat = f(x_t, "") + g * (f(x_t, y) - f(x_t, ""))   (f = the model output, eps or v)

        Returns uint8 ``[len(prompts) * num_images_per_prompt, H, W, 3]``, prompt-major order.
        The noise of image j of prompt p depends only on (seed, p's position, j), so results do not
        change with ``batch_size``.
        """
        self.unet.eval()
        device = next(self.unet.parameters()).device
        all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        uniq = sorted(set(all_prompts))
        hidden, mask = self.text_encoder.encode(uniq + [""])
        row = {p: i for i, p in enumerate(uniq)}
        null_h, null_m = hidden[-1:], mask[-1:]
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(num_inference_steps)
        s = self.image_size
        noise = torch.empty(len(all_prompts), 3, s, s)
        for n in range(len(all_prompts)):
            g = torch.Generator().manual_seed(seed * 1_000_003 + n)
            noise[n] = torch.randn(3, s, s, generator=g)
        out = []
        for start in range(0, len(all_prompts), batch_size):
            idx = torch.tensor([row[p] for p in all_prompts[start : start + batch_size]])
            x = noise[start : start + batch_size].to(device)
            b = len(idx)
            guided = guidance_scale != 1.0  # at 1 the unconditional branch cancels out: skip it
            if guided:
                h = torch.cat([null_h.expand(b, -1, -1), hidden[idx]]).to(device)
                m = torch.cat([null_m.expand(b, -1), mask[idx]]).to(device)
            else:
                h, m = hidden[idx].to(device), mask[idx].to(device)
            for t in sched.timesteps:
                if guided:
                    e_null, e_cond = self.unet(torch.cat([x, x]), t, h, encoder_attention_mask=m).sample.chunk(2)
                    pred = e_null + guidance_scale * (e_cond - e_null)
                else:
                    pred = self.unet(x, t, h, encoder_attention_mask=m).sample
                x = sched.step(pred, t, x).prev_sample
            out.append(to_uint8(x.cpu()))
        return np.concatenate(out) if out else np.zeros((0, s, s, 3), np.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
