"""The one sampling loop of both pipeline kinds: DDIM or DPM-Solver++ with classifier-free guidance."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

from pogdiff.pipelines.base import Sampler, to_uint8


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
    """DDIM or DPM-Solver++ with classifier-free guidance:

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
