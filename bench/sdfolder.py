"""A Stable-Diffusion-format folder with random weights, written by diffusers itself (the standard
``model_index.json`` layout), for benchmarks and tests that need the SD path without downloading one.

The tokenizer is a real byte-level BPE CLIP tokenizer over a small local vocabulary (printable ASCII
and a few merges), so captions tokenize as they would, only into more pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# A UNet with Stable Diffusion 1.5's architecture (diffusers' defaults are SD 1.x's; 1.5 attends to
# 768-d CLIP ViT-L/14 states). ~860 M parameters.
SD15_UNET = {"cross_attention_dim": 768}
# A few-thousand-parameter UNet: two levels, one cross-attention block.
TINY_UNET = {"block_out_channels": (8, 16), "layers_per_block": 1, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 4, "norm_num_groups": 4}


def tiny_tokenizer(folder: Path, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over printable ASCII plus the merges ``re`` and ``red</w>``, saved in ``folder``."""
    chars = [chr(i) for i in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars] + ["re", "red</w>"]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def sd_folder(root: Path, image_size: int = 16, unet: dict | None = None, text_hidden: int = 32, seed: int = 0) -> Path:
    """Write ``root/base``: random CLIP text encoder (2 layers, ``text_hidden`` wide), a 2-level VAE
    (latents 4 x image_size/2 x image_size/2), a UNet (``TINY_UNET`` unless ``unet`` gives its config)
    and SD 1.x's PNDM scheduler config. Returns the folder."""
    tok = tiny_tokenizer(root / "vocab")
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=image_size,
    )
    config = {"cross_attention_dim": text_hidden, **(TINY_UNET if unet is None else unet)}
    net = diffusers.UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4, **config)
    # SD 1.x ships a PNDM scheduler config; training uses DDPM built from it, saving writes PNDM back
    sched = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=net, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(root / "base")
    return root / "base"
