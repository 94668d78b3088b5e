"""The index stage as library calls: caption embeddings, the neighbour graph, image features.

Embedding is incremental: vectors already known (keyed by caption id = content hash of the caption,
under the same embedder key) are reused, so a re-run over unchanged data embeds nothing. The graph is
exact (blockwise torch) up to ``IndexConfig.ann_threshold`` captions; above it an all-pairs ANN search
(``pogdiff.knn``) proposes candidates and the graph is refined from those.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from pogdiff.config import IndexConfig
from pogdiff.embedders import Embedder, embed_captions, make_embedder
from pogdiff.features import FeatureExtractor, make_extractor
from pogdiff.knn import ann_candidates
from pogdiff.neighbours import exact_graph, graph_from_candidates

if TYPE_CHECKING:
    from pogdiff.pipelines.base import TextToImagePipeline


def caption_id(caption: str) -> str:
    """Stable id of a caption text: first 32 hex of its sha256."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class CaptionGraph:
    """Captions sorted by id. vectors ``[C, D]``; counts ``[C]``; nb_index / nb_sims ``[C, k]`` (-1 / -inf
    where fewer than k neighbours exist); density ``[C]`` rho_eff; embedded / reused = captions newly
    embedded / taken from the store; embedder = the key of the embedding space; mode = how the top-k
    was found. Before ``with_graph`` the neighbour arrays are empty (``[C, 0]``)."""

    ids: list[str]
    captions: list[str]
    vectors: np.ndarray
    counts: np.ndarray
    nb_index: np.ndarray
    nb_sims: np.ndarray
    density: np.ndarray
    embedded: int
    reused: int = 0
    embedder: str = ""
    mode: Literal["exact", "ann", "none"] = "exact"


def embed_caption_counts(
    counts: dict[str, int], known: dict[str, np.ndarray], cfg: IndexConfig, embedder: Embedder | None = None, progress: bool = False
) -> CaptionGraph:
    """Vectors of every caption in ``counts`` (caption -> training images), embedding only ids not in ``known``.

    Returns a graph without neighbours (mode ``none``); ``with_graph`` fills them in.
    """
    if not counts:
        raise ValueError("no captions to index: the dataset is empty")
    embedder = embedder or make_embedder(cfg)
    by_id = {caption_id(c): c for c in counts}
    ids = sorted(by_id)
    result = embed_captions(embedder, {i: by_id[i] for i in ids}, known, cfg.batch_size, progress)
    return CaptionGraph(
        ids=ids,
        captions=[by_id[i] for i in ids],
        vectors=np.stack([result.vectors[i] for i in ids]).astype(np.float32),
        counts=np.array([counts[by_id[i]] for i in ids], np.int64),
        nb_index=np.zeros((len(ids), 0), np.int64),
        nb_sims=np.zeros((len(ids), 0), np.float32),
        density=np.asarray([counts[by_id[i]] for i in ids], np.float64),
        embedded=result.embedded,
        reused=result.reused,
        embedder=embedder.key,
        mode="none",
    )


def needs_ann(num_captions: int, cfg: IndexConfig) -> bool:
    """Above ``ann_threshold`` captions the exact C^2 pass is too slow; an ANN index supplies candidates."""
    return num_captions > cfg.ann_threshold


def with_graph(graph: CaptionGraph, cfg: IndexConfig, candidates: np.ndarray | None = None,
               candidate_sims: np.ndarray | None = None) -> CaptionGraph:
    """Fill top-k neighbours and rho_eff: exact if ``candidates`` is None, else refined from them.

    candidates ``[C, L]`` row indices into ``graph.ids`` (-1 = none), e.g. ANN hits per caption;
    candidate_sims ``[C, L]`` their exact cosines when the search returned them (else recomputed).
    """
    v = torch.from_numpy(graph.vectors)
    n = torch.from_numpy(graph.counts).float()
    if candidates is None:
        nb, sims, rho = exact_graph(v, n, cfg.k, cfg.density_bandwidth, device="cuda" if torch.cuda.is_available() else "cpu")
        mode = "exact"
    else:
        given = None if candidate_sims is None else torch.from_numpy(candidate_sims)
        nb, sims, rho = graph_from_candidates(v, n, torch.from_numpy(candidates).long(), cfg.k, cfg.density_bandwidth,
                                              candidate_sims=given)
        mode = "ann"
    return replace(graph, nb_index=nb.numpy(), nb_sims=sims.numpy(), density=rho.numpy().astype(np.float64), mode=mode)


def neighbours_of(graph: CaptionGraph, cfg: IndexConfig) -> CaptionGraph:
    """``with_graph`` as the index stage runs it: exact up to ``cfg.ann_threshold`` captions, from the
    all-pairs ANN search's candidates above it."""
    if needs_ann(len(graph.ids), cfg):
        return with_graph(graph, cfg, *ann_candidates(graph.vectors, cfg))
    return with_graph(graph, cfg)


def build_caption_graph(
    counts: dict[str, int], known: dict[str, np.ndarray], cfg: IndexConfig, embedder: Embedder | None = None, progress: bool = False
) -> CaptionGraph:
    """Embed the captions not in ``known`` (caption id -> vector), then the top-k and rho_eff (``neighbours_of``)."""
    return neighbours_of(embed_caption_counts(counts, known, cfg, embedder, progress), cfg)


def image_extractor(cfg: IndexConfig, loaded: Mapping[str, TextToImagePipeline] | None = None) -> FeatureExtractor:
    """psi's image feature extractor as ``cfg`` names it (``image_feature``, its model and size).

    ``loaded``: pipelines the caller already holds, by the name they were loaded from (untrained), so
    the base model is not loaded a second time just to name its features.
    """
    pipe = (loaded or {}).get(cfg.feature_model) if cfg.image_feature == "unet" else None
    return make_extractor(cfg.image_feature, cfg.image_feature_size, cfg.feature_model, pipe=pipe)


def image_features(images: np.ndarray, extractor: FeatureExtractor) -> np.ndarray:
    """Features for psi's image similarity: uint8 ``[N, H, W, 3]`` -> float32 ``[N, F]`` (L2-normalised)."""
    if len(images) == 0:
        return np.zeros((0, extractor.dim), np.float32)
    return extractor(images).numpy()
