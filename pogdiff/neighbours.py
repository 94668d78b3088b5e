"""Caption neighbour graph, effective density, neighbour sampling and the PoG weight psi.

psi_i = lam * s_img(i, i')^a * (rho_eff(y_i) / mean rho_eff)^(-b) * w(t)        (DESIGN §4)

with s_img the cosine of image features of sample i and its neighbour sample i', clipped to [0, 1];
rho_eff the kernel-smoothed caption count (label distribution smoothing over caption embeddings);
w(t) = 1 (constant) or t / T (linear).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# Cosine at or above this is an exact duplicate of the caption and never its own neighbour.
DUPLICATE_COS = 1.0 - 1e-5


def knn_graph(vectors: torch.Tensor, k: int, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours of every row, itself and exact duplicates excluded.

    vectors ``[C, D]`` (L2-normalised). Returns ids ``[C, k]`` (long, -1 where fewer than k exist)
    and similarities ``[C, k]`` (float, -inf where missing), sorted by decreasing similarity.
    Memory is ``block * C`` floats, so it scales to ~1e5 captions on one machine.
    """
    c = vectors.shape[0]
    kk = min(k, max(c - 1, 0))
    ids = torch.full((c, k), -1, dtype=torch.long)
    sims = torch.full((c, k), float("-inf"))
    if kk == 0:
        return ids, sims
    v = vectors.float()
    for start in range(0, c, block):
        s = v[start : start + block] @ v.T  # [b, C]
        rows = torch.arange(s.shape[0])
        s[rows, rows + start] = float("-inf")
        s[s >= DUPLICATE_COS] = float("-inf")
        top_s, top_i = s.topk(kk, dim=1)
        top_i[top_s == float("-inf")] = -1
        ids[start : start + block, :kk] = top_i
        sims[start : start + block, :kk] = top_s
    return ids, sims


def effective_density(vectors: torch.Tensor, counts: torch.Tensor, bandwidth: float, block: int = 4096) -> torch.Tensor:
    """rho_eff(i) = sum_j n_j exp(-(1 - cos(e_i, e_j))^2 / (2 h^2)); vectors ``[C, D]``, counts ``[C]`` -> ``[C]``.

    The kernel is 1 at the caption itself, so rho_eff >= n_i; close captions add their counts.
    """
    v = vectors.float()
    n = counts.float()
    out = torch.empty(v.shape[0])
    for start in range(0, v.shape[0], block):
        d = 1.0 - (v[start : start + block] @ v.T).clamp(-1, 1)
        out[start : start + block] = torch.exp(-d.pow(2) / (2 * bandwidth**2)) @ n
    return out


@dataclass(frozen=True)
class NeighbourGraph:
    """Everything the trainer needs to draw a neighbour and weigh it, as dense tensors.

    caption_of ``[N]`` caption index of each image; nb_ids / nb_sims ``[C, k]`` caption neighbours;
    density ``[C]`` rho_eff; image_features ``[N, F]`` L2-normalised; images_of: per caption, the
    image indices ``[n_c]`` (CSR form: ``members`` ``[N]`` and ``offsets`` ``[C + 1]``).
    """

    caption_of: torch.Tensor
    nb_ids: torch.Tensor
    nb_sims: torch.Tensor
    density: torch.Tensor
    image_features: torch.Tensor
    members: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def build(cls, caption_of, nb_ids, nb_sims, density, image_features) -> "NeighbourGraph":
        order = torch.argsort(caption_of, stable=True)
        counts = torch.bincount(caption_of, minlength=nb_ids.shape[0])
        offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(caption_of, nb_ids, nb_sims, density.float(), image_features.float(), order, offsets)

    @property
    def num_captions(self) -> int:
        return self.nb_ids.shape[0]

    def density_ratio(self) -> torch.Tensor:
        """rho_eff(y) / mean over training images of rho_eff, per caption ``[C]``."""
        mean = self.density[self.caption_of].mean()
        return self.density / mean


def sample_neighbour_captions(
    graph: NeighbourGraph,
    captions: torch.Tensor,
    k: int,
    how: Literal["similarity", "uniform"],
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw y' among the top-k neighbours of each caption ``[B] -> [B]`` (-1 where none exists).

    ``similarity``: probability proportional to max(cos, 0) (uniform if all are <= 0);
    ``uniform``: uniform over the valid top-k.
    """
    ids = graph.nb_ids[captions, :k]
    valid = ids >= 0
    if how == "similarity":
        w = graph.nb_sims[captions, :k].clamp_min(0) * valid
        w = torch.where(w.sum(1, keepdim=True) > 0, w, valid.float())
    else:
        w = valid.float()
    has = valid.any(1)
    w[~has, 0] = 1.0  # placeholder row so multinomial is defined; masked below
    pick = torch.multinomial(w, 1, generator=generator).squeeze(1)
    out = ids.gather(1, pick[:, None]).squeeze(1)
    return torch.where(has, out, torch.full_like(out, -1))


def sample_member_images(graph: NeighbourGraph, captions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One image index uniformly among the images of each caption ``[B] -> [B]`` (captions must be >= 0)."""
    lo = graph.offsets[captions]
    n = graph.offsets[captions + 1] - lo
    r = (torch.rand(len(captions), generator=generator) * n).long().clamp_max(n - 1)
    return graph.members[lo + r]


def image_similarity(graph: NeighbourGraph, images: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """s_img = clip(cos(feat_i, feat_i'), 0, 1) for index pairs ``[B], [B] -> [B]``."""
    f = graph.image_features
    return (f[images] * f[other]).sum(1).clamp(0, 1)


def psi_weight(
    s_img: torch.Tensor,
    density_ratio: torch.Tensor,
    t: torch.Tensor,
    num_train_timesteps: int,
    lam: float,
    a: float,
    b: float,
    schedule: Literal["constant", "linear"],
    psi_max: float,
) -> torch.Tensor:
    """psi = lam * s_img^a * ratio^(-b) * w(t), clipped to [0, psi_max]; all inputs ``[B]``."""
    if schedule == "linear":
        w = t.float() / num_train_timesteps
    else:
        w = torch.ones_like(s_img)
    psi = lam * s_img.pow(a) * density_ratio.clamp_min(1e-12).pow(-b) * w
    return psi.clamp(0, psi_max)
