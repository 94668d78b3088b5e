"""The index stage as library calls: caption embeddings, the neighbour graph, image features.

Embedding is incremental: vectors already known (keyed by caption id = content hash of the caption
and the embedder) are reused, so a re-run over unchanged data embeds nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from pogdiff.config import IndexConfig
from pogdiff.features import make_extractor
from pogdiff.neighbours import effective_density, knn_graph
from pogdiff.text import load_text_encoder


def caption_id(caption: str) -> str:
    """Stable id of a caption text: first 32 hex of its sha256."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class CaptionGraph:
    """Captions sorted by id. vectors ``[C, D]``; counts ``[C]``; nb_index / nb_sims ``[C, k]`` (-1 / -inf
    where fewer than k neighbours exist); density ``[C]`` rho_eff; embedded = captions newly embedded."""

    ids: list[str]
    captions: list[str]
    vectors: np.ndarray
    counts: np.ndarray
    nb_index: np.ndarray
    nb_sims: np.ndarray
    density: np.ndarray
    embedded: int


def build_caption_graph(counts: dict[str, int], known: dict[str, np.ndarray], cfg: IndexConfig) -> CaptionGraph:
    """Embed the captions not in ``known`` (caption id -> vector), then compute top-k and rho_eff.

    counts: caption -> training images. Returns the graph over all captions in ``counts``.
    """
    if not counts:
        raise ValueError("no captions to index: the dataset is empty")
    by_id = {caption_id(c): c for c in counts}
    ids = sorted(by_id)
    missing = [i for i in ids if i not in known]
    vectors = dict(known)
    if missing:
        enc = load_text_encoder()
        new = enc.embed([by_id[i] for i in missing], batch_size=cfg.batch_size).numpy()
        vectors.update(zip(missing, new))
    v = torch.from_numpy(np.stack([vectors[i] for i in ids]).astype(np.float32))
    n = torch.tensor([counts[by_id[i]] for i in ids], dtype=torch.float32)
    nb, sims = knn_graph(v, cfg.k)
    rho = effective_density(v, n, cfg.density_bandwidth)
    return CaptionGraph(
        ids=ids,
        captions=[by_id[i] for i in ids],
        vectors=v.numpy(),
        counts=n.numpy().astype(np.int64),
        nb_index=nb.numpy(),
        nb_sims=sims.numpy(),
        density=rho.numpy(),
        embedded=len(missing),
    )


def image_features(images: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    """Features for psi's image similarity: uint8 ``[N, H, W, 3]`` -> float32 ``[N, F]`` (L2-normalised)."""
    if len(images) == 0:
        return np.zeros((0, 3 * cfg.image_feature_size**2), np.float32)
    return make_extractor(cfg.image_feature, cfg.image_feature_size)(images).numpy()
