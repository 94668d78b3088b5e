"""Caption neighbour graph, effective density, neighbour sampling and the PoG weight psi.

psi_i = lam * s^(a) * (rho_eff(y_i) / mean rho_eff)^(-b) * w(t)        (DESIGN §4)
s     = clip((s_img(i, i') - tau) / (1 - tau), 0, 1)

with s_img the cosine of the image features of sample i and its neighbour sample i'; tau the
similarity threshold (a quantile of s_img over random pairs of training images, so one setting fits
every feature's scale); rho_eff the kernel-smoothed caption count (label distribution smoothing over
caption embeddings); w(t) = 1 (constant), t / T (linear) or 1 - t / T (inverse). Below tau a pair
is taken to show different things and psi is 0: borrowing between different individuals erases
what tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from pogdiff.config import PoGConfig


def normalised_feature(x: torch.Tensor) -> torch.Tensor:
    """An image feature from images, pooled pixels or latents ``[N, ...]``: f = normalise(flatten(x) - mean),
    ``[N, F]`` (each row centred on its own mean, then L2-normalised), so s_img = clip(f_i . f_j, 0, 1)."""
    flat = x.float().flatten(1)
    return torch.nn.functional.normalize(flat - flat.mean(1, keepdim=True), dim=1)

# Cosine at or above this is an exact duplicate of the caption and never its own neighbour.
DUPLICATE_COS = 1.0 - 1e-5
# The density kernel is cut at this many bandwidths of cosine distance: beyond it one caption adds
# less than exp(-18) ~ 1.5e-8 of its count, and skipping the exp of every pair made the density ~6x faster.
KERNEL_CUTOFF = 6.0


def kernel(dist: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """K(d) = exp(-d^2 / (2 h^2)) on cosine distances d = 1 - cos."""
    return torch.exp(-dist.pow(2) / (2 * bandwidth**2))


def _block_pass(
    s: torch.Tensor, rows: torch.Tensor, k: int, counts: torch.Tensor | None, bandwidth: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One block ``[b, C]`` of cosines (of the rows ``rows`` ``[b]``): top-k without itself and
    duplicates, and sum_j n_j K(1 - s_ij) over the pairs inside the kernel cutoff (if ``counts``). Modifies ``s``.

    One threshold scan finds both the kernel's pairs and the duplicates (a subset of them), so the
    duplicates are masked by index rather than by another pass over the block.
    """
    near = DUPLICATE_COS if counts is None else min(DUPLICATE_COS, 1.0 - KERNEL_CUTOFF * bandwidth)
    r, cols = (s >= near).nonzero(as_tuple=True)
    vals = s[r, cols]
    density = None
    if counts is not None:
        density = torch.zeros(s.shape[0], device=s.device).index_add_(0, r, kernel(1.0 - vals.clamp(-1, 1), bandwidth) * counts[cols])
    dup = vals >= DUPLICATE_COS
    s[r[dup], cols[dup]] = float("-inf")
    s[torch.arange(s.shape[0], device=s.device), rows] = float("-inf")
    if k == 0:
        return torch.zeros(s.shape[0], 0, dtype=torch.long, device=s.device), torch.zeros(s.shape[0], 0, device=s.device), density
    top_s, top_i = s.topk(k, dim=1)
    top_i[top_s == float("-inf")] = -1
    return top_i, top_s, density


def exact_graph(
    vectors: torch.Tensor, counts: torch.Tensor | None, k: int, bandwidth: float, block: int = 2048,
    device: str | torch.device = "cpu", rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Exact top-k cosine neighbours and (if ``counts`` is given) rho_eff, from one pass of block matmuls.

    vectors ``[C, D]`` (L2-normalised), counts ``[C]``. Returns ids ``[R, k]`` (long, -1 where fewer
    than k exist), similarities ``[R, k]`` (-inf where missing), sorted by decreasing similarity, itself
    and exact duplicates (cos >= DUPLICATE_COS) excluded; and density ``[R]`` (see ``effective_density``),
    for the query ``rows`` ``[R]`` (long indices into ``vectors``; default all C, in order) against all C.
    Memory is ``block * C`` floats; time is dominated by the ``R C D`` matmul (~1e5 x 1e5 in a minute
    on 2 cores). On ``device`` (e.g. ``cuda``) the blocks are computed there; the results come back on the CPU.
    """
    c = vectors.shape[0]
    rows = torch.arange(c) if rows is None else rows.long()
    kk = min(k, max(c - 1, 0))
    ids = torch.full((len(rows), k), -1, dtype=torch.long)
    sims = torch.full((len(rows), k), float("-inf"))
    density = None if counts is None else torch.empty(len(rows))
    v = vectors.float().to(device)
    n = None if counts is None else counts.float().to(device)
    for start in range(0, len(rows), block):
        q = rows[start : start + block].to(device)
        top_i, top_s, rho = _block_pass(v[q] @ v.T, q, kk, n, bandwidth)
        ids[start : start + block, :kk] = top_i.cpu()
        sims[start : start + block, :kk] = top_s.cpu()
        if rho is not None:
            density[start : start + block] = rho.cpu()
    return ids, sims, density


def knn_graph(vectors: torch.Tensor, k: int, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours of every row, itself and exact duplicates excluded.

    vectors ``[C, D]`` (L2-normalised). Returns ids ``[C, k]`` (long, -1 where fewer than k exist)
    and similarities ``[C, k]`` (float, -inf where missing), sorted by decreasing similarity.
    """
    ids, sims, _ = exact_graph(vectors, None, k, 1.0, block)
    return ids, sims


def effective_density(vectors: torch.Tensor, counts: torch.Tensor, bandwidth: float, block: int = 2048) -> torch.Tensor:
    """rho_eff(i) = sum_j n_j exp(-(1 - cos(e_i, e_j))^2 / (2 h^2)); vectors ``[C, D]``, counts ``[C]`` -> ``[C]``.

    The kernel is 1 at the caption itself, so rho_eff >= n_i; close captions add their counts. Pairs
    farther than KERNEL_CUTOFF * h in cosine distance are left out (each would add < 1.5e-8 n_j).
    """
    return exact_graph(vectors, counts, 0, bandwidth, block)[2]


def graph_from_candidates(
    vectors: torch.Tensor, counts: torch.Tensor, candidates: torch.Tensor, k: int, bandwidth: float, block: int = 1024,
    candidate_sims: torch.Tensor | None = None, rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k and rho_eff from approximate candidate lists (e.g. an ANN index's hits).

    vectors ``[C, D]`` (L2-normalised), counts ``[C]``, candidates ``[R, L]`` row indices (-1 = none;
    may hold the row itself and repeats) of the query ``rows`` ``[R]`` (default all C, in order).
    Similarities are recomputed exactly from the vectors, unless ``candidate_sims`` ``[R, L]`` gives
    them (an index that stores the vectors uncompressed, such as faiss' flat IVF and HNSW, returns
    exact inner products: no ``[b, L, D]`` gather is needed); either way only the candidate *set* is
    approximate. Returns ids ``[R, k]``, sims ``[R, k]`` as ``exact_graph`` and
    rho_eff(i) = n_i + sum over distinct candidates j != i of n_j K(1 - cos_ij): exact when every caption
    within the kernel's reach is among the L candidates, an underestimate in clusters larger than that.
    """
    c, width = candidates.shape
    rows = torch.arange(c) if rows is None else rows.long()
    kk = min(k, width)
    ids = torch.full((c, k), -1, dtype=torch.long)
    sims = torch.full((c, k), float("-inf"))
    density = torch.empty(c)
    v = vectors.float()
    n = counts.float()
    for start in range(0, c, block):
        cand = candidates[start : start + block].clone()
        own = rows[start : start + cand.shape[0]]
        # repeats of a hit would count twice in the density: keep the first of each id per row
        srt, order = cand.sort(dim=1)
        dup_sorted = torch.zeros_like(cand, dtype=torch.bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
        bad = (cand < 0) | (cand == own[:, None]) | dup
        cand[bad] = 0
        if candidate_sims is None:
            s = (v[own, None, :] * v[cand]).sum(-1).clamp(-1, 1)  # [b, L]
        else:
            s = candidate_sims[start : start + cand.shape[0]].float().clamp(-1, 1)
        kern = torch.where(bad | (s <= 1.0 - KERNEL_CUTOFF * bandwidth), 0.0, kernel(1.0 - s, bandwidth))
        density[start : start + cand.shape[0]] = n[own] + (kern * n[cand]).sum(1)
        s = s.masked_fill(bad | (s >= DUPLICATE_COS), float("-inf"))
        top_s, pos = s.topk(kk, dim=1)
        top_i = cand.gather(1, pos)
        top_i[top_s == float("-inf")] = -1
        ids[start : start + cand.shape[0], :kk] = top_i
        sims[start : start + cand.shape[0], :kk] = top_s
    return ids, sims, density


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

    @cached_property
    def density_ratio(self) -> torch.Tensor:
        """rho_eff(y) / mean over training images of rho_eff, per caption ``[C]``; computed once (O(N)),
        since the trainer reads it every step."""
        mean = self.density[self.caption_of].mean()
        return self.density / mean


def similarity_threshold(features: torch.Tensor, caption_of: torch.Tensor, quantile: float, pairs: int = 20_000,
                         seed: int = 0) -> float:
    """tau = the ``quantile`` of clip(cos, 0, 1) over ``pairs`` random pairs of training images of different captions.

    features ``[N, F]`` L2-normalised, caption_of ``[N]``. Seeded independently of training, so the same
    data and features give the same tau. ``quantile`` 0 gives tau = 0 (no threshold); a set with one
    caption has no pairs and gives tau = 0 too.
    """
    n = caption_of.shape[0]
    if quantile <= 0 or n < 2:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(n, (pairs,), generator=g), torch.randint(n, (pairs,), generator=g)
    keep = caption_of[i] != caption_of[j]
    if not keep.any():
        return 0.0
    s = (features[i[keep]].float() * features[j[keep]].float()).sum(1).clamp(0, 1)
    return float(torch.quantile(s, quantile))


def thresholded(s_img: torch.Tensor, tau: float) -> torch.Tensor:
    """s = clip((s_img - tau) / (1 - tau), 0, 1), elementwise."""
    if tau >= 1.0:
        return torch.zeros_like(s_img)
    return ((s_img - tau) / (1.0 - tau)).clamp(0, 1)


@dataclass(frozen=True)
class Borrowing:
    """One batch's neighbour draw: nb_caption ``[B]`` (-1: none), s_img ``[B]`` (raw cosine of the pair,
    0 where none), psi ``[B]`` (0 where none, for dropped captions and at or below ``psi_threshold``)."""

    nb_caption: torch.Tensor
    s_img: torch.Tensor
    psi: torch.Tensor

    @property
    def active(self) -> torch.Tensor:
        return self.psi > 0


@dataclass(frozen=True)
class NeighbourPick:
    """The neighbour drawn for each of B samples, before its weight: caption ``[B]`` (-1: none),
    s ``[B]`` its thresholded image similarity and s_img ``[B]`` the raw cosine (both 0 where none)."""

    caption: torch.Tensor
    s: torch.Tensor
    s_img: torch.Tensor

    @property
    def has(self) -> torch.Tensor:
        return self.caption >= 0


def draw_borrowing(
    graph: NeighbourGraph,
    images: torch.Tensor,
    t: torch.Tensor,
    dropped: torch.Tensor,
    pog: PoGConfig,
    tau: float,
    num_train_timesteps: int,
    generator: torch.Generator,
) -> Borrowing:
    """For each training image ``[B]``, draw y' among its caption's top-k and one image i' of y'
    (``pick_neighbours``), and weigh it (``weigh_borrowing``). t ``[B]``; ``dropped`` ``[B]`` marks
    captions dropped for guidance, which never borrow."""
    pick = pick_neighbours(graph, images, dropped, pog, tau, generator)
    return weigh_borrowing(graph, images, t, pick, pog, num_train_timesteps)


def pick_neighbours(
    graph: NeighbourGraph, images: torch.Tensor, dropped: torch.Tensor, pog: PoGConfig, tau: float, generator: torch.Generator
) -> NeighbourPick:
    """Each candidate y'_j (j < k) of each training image ``[B]`` gets one image drawn from its members;
    candidates are ranked by caption and image similarity together, weight_j = max(cos(y, y'_j), 0) * s_j
    with s_j the thresholded image similarity (``similarity``), or s_j > 0 alone (``uniform``), and y' is
    drawn in proportion. A sample whose candidates all fall below tau, or whose caption was ``dropped``
    ``[B]``, gets none.
    """
    caps = graph.caption_of[images]
    k = min(pog.k, graph.nb_ids.shape[1])
    ids = graph.nb_ids[caps, :k]  # [B, k]
    valid = ids >= 0
    members = sample_member_images(graph, ids.clamp_min(0).flatten(), generator).view(ids.shape)
    raw = image_similarity(graph, images, members)
    s = thresholded(raw, tau) * valid
    if pog.neighbour_sampling == "similarity":
        w = graph.nb_sims[caps, :k].clamp_min(0) * s  # -inf (no neighbour) -> 0
    else:
        w = (s > 0).float()
    has = (w > 0).any(1) & ~dropped
    w[~has] = 1.0  # any row makes multinomial defined; masked below
    pick = torch.multinomial(w, 1, generator=generator)
    none = torch.zeros(len(images))
    return NeighbourPick(torch.where(has, ids.gather(1, pick).squeeze(1), -1), torch.where(has, s.gather(1, pick).squeeze(1), none),
                         torch.where(has, raw.gather(1, pick).squeeze(1), none))


def weigh_borrowing(
    graph: NeighbourGraph, images: torch.Tensor, t: torch.Tensor, pick: NeighbourPick, pog: PoGConfig, num_train_timesteps: int
) -> Borrowing:
    """psi ``[B]`` of each picked neighbour (``psi_weight``; 0 where none and at or below ``pog.psi_threshold``)."""
    caps = graph.caption_of[images]
    zero = torch.zeros(len(images))
    psi = torch.where(pick.has, psi_weight(pick.s, graph.density_ratio[caps], t, num_train_timesteps, pog.lam, pog.a,
                                           pog.b, pog.timestep_weight, pog.psi_max), zero)
    psi = torch.where(psi > pog.psi_threshold, psi, zero)
    return Borrowing(torch.where(psi > 0, pick.caption, -1), pick.s_img, psi)


def sample_member_images(graph: NeighbourGraph, captions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One image index uniformly among the images of each caption ``[B] -> [B]`` (captions must be >= 0)."""
    lo = graph.offsets[captions]
    n = graph.offsets[captions + 1] - lo
    r = (torch.rand(len(captions), generator=generator) * n).long().clamp_max(n - 1)
    return graph.members[lo + r]


def image_similarity(graph: NeighbourGraph, images: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """s_img = clip(cos(feat_i, feat_i'), 0, 1) of each image ``[B]`` with ``other`` ``[B]`` or ``[B, k]``
    (k images each), shaped as ``other``. Each image's feature is gathered once, not once per other image."""
    f = graph.image_features
    mine = f[images] if other.dim() == 1 else f[images][:, None, :]
    return (mine * f[other]).sum(-1).clamp(0, 1)


def psi_weight(
    s: torch.Tensor,
    density_ratio: torch.Tensor,
    t: torch.Tensor,
    num_train_timesteps: int,
    lam: float,
    a: float,
    b: float,
    schedule: Literal["constant", "linear", "inverse"],
    psi_max: float,
) -> torch.Tensor:
    """psi = lam * s^a * ratio^(-b) * w(t), clipped to [0, psi_max]; all inputs ``[B]``, s the
    thresholded image similarity in [0, 1] (0^0 counts as 0: no similarity, no borrowing)."""
    if schedule == "linear":
        w = t.float() / num_train_timesteps
    elif schedule == "inverse":
        w = 1.0 - t.float() / num_train_timesteps
    else:
        w = torch.ones_like(s)
    psi = lam * torch.where(s > 0, s.pow(a), torch.zeros_like(s)) * density_ratio.clamp_min(1e-12).pow(-b) * w
    return psi.clamp(0, psi_max)
