"""Per-group evaluation metrics and their aggregation per frequency bucket (DESIGN §6).

A group is one individual (a product, a person: the unit of the long tail) or, for data without an
individual column, one distinct caption. Groups are integer ids ``0..C-1``. Features are
L2-normalised, so cosine = dot product.

gRecall (generative recall). For group i with training images T_i and generated images G_i
(N_i = |G_i|):
  kept_i    = {g in G_i : gate(g)}  where gate is a judge's verdict, or "the nearest real image of g
              (over all groups) belongs to i";
  covered_i = {x in T_i : x is the nearest T_i image of some g in kept_i};
  gRecall_i = |covered_i| / |T_i|.
At most N_i distinct images can be covered, so gRecall_i <= min(N_i, |T_i|) / |T_i|; the normalised
coverage divides by that ceiling instead:
  gRecall_norm_i = |covered_i| / min(N_i, |T_i|),
which equals gRecall_i whenever N_i >= |T_i|.
Identity accuracy_i = share of G_i whose nearest real image belongs to i (the nearest-group gate);
when a judge decides the gate instead, the share the judge accepts is reported beside it.
Feature similarity_i = mean cos(g, x) over G_i x T_i (the DINO-score analogue).

Held-out prompts. For group i with held-out photos H_i (never trained on) and M_i images G_i
generated from their captions, image g prompted by the caption of photo h_g:
  holdout_grecall_i = gRecall_i with T_i replaced by H_i;
  prompt_fidelity_i = |{g : a(g) = a(h_g)}| / M_i, a(.) the attributes an attribute reader reads
                      off an image (an unreadable g is not faithful);
  copy_rate_i       = |{g : g reproduces a training photo of i instead of the prompt}| / M_i, where
                      "reproduces" is a(g) != a(h_g) and a(g) in {a(x) : x in T_i} with a reader, or,
                      without one, s(g) > tau with s(y) = max_{x in T_i} cos(y, x) and tau the
                      COPY_QUANTILE quantile of s(h) over all held-out photos h (each against its own
                      group's training photos): a new photo of i scores as a copy 5 % of the time.

Fréchet distance (the formula of FID, in the configured extractor's feature space, not Inception's;
reported as ``frechet_<feature>``, see ``pogdiff.glossary``):
  d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pogdiff.glossary import BUCKETS, GROUPS, Bucket, rank  # the bucket names live with the metrics' definitions

# Fewest feature rows per set that frechet_distance accepts. The sample covariance needs 2; below
# ~10 rows it is so noisy that the distance says more about which images were drawn than about the
# model. Its bias still falls only as 1/N, so distances are comparable at equal N and extractor only.
FRECHET_MIN_SAMPLES = 10

# The quantile of real held-out photos' similarity to their own group's nearest training photo above
# which a generated image counts as a copy (feature test): 5 % of honest new photos exceed it.
COPY_QUANTILE = 0.95

Attributes = tuple[str, ...]  # what an attribute reader reads off one image, comparable with ==


def nearest_group(real_features: torch.Tensor, real_ids: torch.Tensor, gen_features: torch.Tensor) -> torch.Tensor:
    """``[G]``: the group of each generated image's nearest real image (cosine of the features)."""
    return real_ids[(gen_features @ real_features.T).argmax(1)]


def nearest_group_gate(real_features: torch.Tensor, real_ids: torch.Tensor, gen_features: torch.Tensor, gen_ids: torch.Tensor) -> torch.Tensor:
    """``[G]`` bool: the nearest real image of each generated image belongs to its own group."""
    return nearest_group(real_features, real_ids, gen_features) == gen_ids


def grecall(
    real_features: torch.Tensor,
    real_ids: torch.Tensor,
    gen_features: torch.Tensor,
    gen_ids: torch.Tensor,
    num_groups: int,
    gen_ok: torch.Tensor | None = None,
) -> np.ndarray:
    """gRecall per group ``[C]``: |covered_i| / |T_i| (NaN for groups without real images).

    real_features ``[R, F]``, real_ids ``[R]``, gen_features ``[G, F]``, gen_ids ``[G]``;
    gen_ok ``[G]`` bool replaces the nearest-group gate when given (a judge's verdict).
    """
    if gen_ok is None:
        gen_ok = nearest_group_gate(real_features, real_ids, gen_features, gen_ids)
    out = np.full(num_groups, np.nan)
    for c in range(num_groups):
        real = (real_ids == c).nonzero().squeeze(1)
        if len(real) == 0:
            continue
        kept = ((gen_ids == c) & gen_ok).nonzero().squeeze(1)
        if len(kept) == 0:
            out[c] = 0.0
            continue
        nearest = (gen_features[kept] @ real_features[real].T).argmax(1)
        out[c] = len(torch.unique(nearest)) / len(real)
    return out


def grecall_normalised(grecall_values: np.ndarray, real_counts: np.ndarray, gen_counts: np.ndarray) -> np.ndarray:
    """Normalised coverage per group ``[C]`` from gRecall ``[C]``, |T_i| ``[C]`` and N_i ``[C]``.

    gRecall_norm_i = gRecall_i * |T_i| / min(N_i, |T_i|) = |covered_i| / min(N_i, |T_i|):
    the share of the images that N_i samples could cover at most. |covered_i| = gRecall_i |T_i| is
    rounded to the integer it is, so 4 of 12 covered by 4 samples gives exactly 1. Where
    N_i >= |T_i| the value is gRecall_i itself (returned unchanged). NaN where
    gRecall is NaN (no real images). Raises ``ValueError`` for a group with real images but no
    generated ones (N_i = 0: no coverage is possible, so its share is undefined).
    """
    raw = np.asarray(grecall_values, np.float64)
    real = np.asarray(real_counts, np.int64)
    gen = np.asarray(gen_counts, np.int64)
    if not raw.shape == real.shape == gen.shape:
        raise ValueError(f"shapes differ: gRecall {raw.shape}, real counts {real.shape}, generated counts {gen.shape}")
    empty = np.flatnonzero((real > 0) & (gen <= 0))
    if len(empty):
        raise ValueError(f"group {int(empty[0])} has {int(real[empty[0]])} real images but no generated ones: "
                         "its normalised coverage is undefined")
    capped = (gen < real) & ~np.isnan(raw)
    out = raw.copy()
    out[capped] = np.rint(raw[capped] * real[capped]) / gen[capped]
    return out


def faithful(read: list[Attributes | None], asked: list[Attributes | None]) -> np.ndarray:
    """``[G]`` bool: image g shows what its prompt asked for, read[g] == asked[g] (None, unreadable,
    is never faithful). read: the attributes read off the generated images; asked: those read off
    the photo whose caption prompted each one."""
    if len(read) != len(asked):
        raise ValueError(f"{len(read)} read attribute tuples for {len(asked)} prompts")
    return np.array([r is not None and r == a for r, a in zip(read, asked)], bool)


def copies_by_attributes(read: list[Attributes | None], asked: list[Attributes | None],
                         training: list[set[Attributes]]) -> np.ndarray:
    """``[G]`` bool: image g shows one of its group's training photos instead of its prompt: read[g]
    is readable, differs from asked[g] and is in training[g], the attributes read off the training
    photos of g's group."""
    if not len(read) == len(asked) == len(training):
        raise ValueError(f"{len(read)} read, {len(asked)} asked and {len(training)} training attribute sets: one of each per image")
    return np.array([r is not None and r != a and r in t for r, a, t in zip(read, asked, training)], bool)


def own_nearest_similarity(features: torch.Tensor, ids: torch.Tensor, real_features: torch.Tensor,
                           real_ids: torch.Tensor) -> torch.Tensor:
    """``[G]``: s(y) = max_{x in T_ids[g]} cos(y, x), the cosine of each of ``features`` ``[G, F]`` to the
    nearest real image ``[R, F]`` of its own group (``ids`` ``[G]``, ``real_ids`` ``[R]``); -inf for a
    group without real images."""
    sims = features @ real_features.T
    return sims.masked_fill(ids[:, None] != real_ids[None, :], float("-inf")).max(1).values


def copy_threshold(holdout_features: torch.Tensor, holdout_ids: torch.Tensor, real_features: torch.Tensor,
                   real_ids: torch.Tensor, quantile: float = COPY_QUANTILE) -> float:
    """tau: the ``quantile`` (linear interpolation) of s(h) (``own_nearest_similarity``) over the
    held-out photos ``[H, F]`` of groups ``[H]``, each against its own group's real (training) images."""
    s = own_nearest_similarity(holdout_features, holdout_ids, real_features, real_ids).double().numpy()
    if len(s) == 0 or not np.isfinite(s).all():
        raise ValueError("the copy threshold needs held-out photos of groups that have training images")
    return float(np.quantile(s, quantile))


def per_group_mean(values: torch.Tensor, ids: torch.Tensor, num_groups: int) -> np.ndarray:
    """Mean of ``values`` ``[G]`` per group id ``[G]`` -> ``[C]`` (NaN where a group has none)."""
    out = np.full(num_groups, np.nan)
    for c in range(num_groups):
        sel = ids == c
        if sel.any():
            out[c] = values[sel].float().mean().item()
    return out


def feature_similarity(real_features, real_ids, gen_features, gen_ids, num_groups: int) -> np.ndarray:
    """Mean cosine of generated to real images of the same group, per group ``[C]``."""
    out = np.full(num_groups, np.nan)
    for c in range(num_groups):
        r, g = real_features[real_ids == c], gen_features[gen_ids == c]
        if len(r) and len(g):
            out[c] = (g @ r.T).mean().item()
    return out


def separability(prompted: np.ndarray, assigned: np.ndarray) -> float:
    """Normalised mutual information between the individual each image was prompted for and the one
    it shows: NMI = I(P; A) / ((H(P) + H(A)) / 2), in [0, 1]; both ``[G]`` integer labels (any values).

    1 when every individual's images are told apart from every other's (even if misread consistently),
    0 when what an image shows is independent of its prompt: the conditioning has collapsed. NaN with
    fewer than two prompted individuals.
    """
    p = np.unique(np.asarray(prompted), return_inverse=True)[1]
    a = np.unique(np.asarray(assigned), return_inverse=True)[1]
    if p.max(initial=0) < 1:
        return math.nan
    joint = np.zeros((p.max() + 1, a.max() + 1))
    np.add.at(joint, (p, a), 1.0)
    joint /= joint.sum()
    pp, pa = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pp, pa)[nz])).sum())
    h = -float((pp * np.log(pp)).sum()) - float((pa[pa > 0] * np.log(pa[pa > 0])).sum())
    return max(0.0, 2.0 * mi / h) if h > 0 else 0.0


def assign_buckets(counts: np.ndarray, many_above: int, few_below: int) -> list[Bucket]:
    """Bucket per group from its training count ``[C]``: many if n > many_above, few if n < few_below."""
    return ["many" if n > many_above else "few" if n < few_below else "medium" for n in counts]


def metric_names(metrics: dict[str, float]) -> list[str]:
    """Metric names in ``{"<group>/<metric>": v}`` keys (group = a bucket or overall), in the glossary's
    display order (``pogdiff.glossary.rank``).

    Other keys (``train/loss``) are ignored; unknown metric names follow the known ones alphabetically.
    """
    return sorted({k.split("/", 1)[1] for k in metrics if "/" in k and k.split("/", 1)[0] in GROUPS}, key=rank)


def bucket_means(per_group: dict[str, np.ndarray], buckets: list[Bucket]) -> dict[str, float]:
    """Macro average over groups: ``{"<bucket>/<metric>": v, "overall/<metric>": v}``.

    per_group: metric -> ``[C]`` values (NaN = no value); buckets: ``[C]``. Buckets without
    groups are left out rather than reported as 0.
    """
    b = np.array(buckets)
    out: dict[str, float] = {}
    for metric, values in per_group.items():
        for name in (*BUCKETS, "overall"):
            sel = np.ones(len(b), bool) if name == "overall" else b == name
            v = values[sel]
            v = v[~np.isnan(v)]
            if len(v):
                out[f"{name}/{metric}"] = float(v.mean())
    return out


def _covariance(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / (len(x) - 1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues clip to 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(features_a, features_b, min_samples: int = FRECHET_MIN_SAMPLES) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[Na, F]`` and ``[Nb, F]``.

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}),
    S = sample covariance (ddof 1). The trace term equals tr(sqrtm(S_a S_b)) (the two products share
    their eigenvalues), but the symmetric form needs only eigendecompositions of symmetric PSD
    matrices: real, stable, no complex round-off. Computed in float64. Returns d^2 (as FID does),
    0 for identical sets, clipped at 0 against round-off. Raises ``ValueError`` when a set has
    fewer than ``min_samples`` rows (see ``FRECHET_MIN_SAMPLES``), the feature sizes differ, or a
    value is not finite.
    """
    a = np.asarray(features_a.detach().cpu() if isinstance(features_a, torch.Tensor) else features_a, np.float64)
    b = np.asarray(features_b.detach().cpu() if isinstance(features_b, torch.Tensor) else features_b, np.float64)
    if min_samples < 2:
        raise ValueError(f"min_samples must be >= 2 (a covariance needs two samples), got {min_samples}")
    for name, x in (("features_a", a), ("features_b", b)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be [N, F], got shape {x.shape}")
        if len(x) < min_samples:
            raise ValueError(f"frechet_distance needs at least {min_samples} samples per set; {name} has {len(x)}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or inf")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: features_a has {a.shape[1]}, features_b has {b.shape[1]}")
    mu_a, s_a = _covariance(a)
    mu_b, s_b = _covariance(b)
    root_a = _psd_sqrt(s_a)
    m = root_a @ s_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d2 = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)
    return max(d2, 0.0)


def bucket_frechet(
    real_features: torch.Tensor,
    real_ids: torch.Tensor,
    gen_features: torch.Tensor,
    gen_ids: torch.Tensor,
    buckets: list[str],
    name: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """Fréchet distance per bucket and overall: generated vs real images of the bucket's individuals,
    pooled (overall: every individual's images in one set, not a mean of the buckets).

    Features ``[R, F]`` / ``[G, F]`` with individual ids ``[R]`` / ``[G]``; ``buckets[c]`` is
    individual c's bucket; ``name`` is the metric's name (``glossary.frechet_metric``). Returns
    ``({"<bucket>/<name>": d2}, {"<name>.<bucket>": note})``: a bucket with fewer than
    ``FRECHET_MIN_SAMPLES`` images on either side gets no value (not NaN), and its note says why.
    """
    b = np.array(buckets)
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    for group in (*BUCKETS, "overall"):
        members = torch.from_numpy(np.flatnonzero(np.ones(len(b), bool) if group == "overall" else b == group))
        if len(members) == 0:
            continue
        r = real_features[torch.isin(real_ids, members)]
        g = gen_features[torch.isin(gen_ids, members)]
        counts = f"{len(g)} generated vs {len(r)} real images"
        if min(len(r), len(g)) < FRECHET_MIN_SAMPLES:
            notes[f"{name}.{group}"] = f"left out: {counts}, fewer than FRECHET_MIN_SAMPLES={FRECHET_MIN_SAMPLES}"
            continue
        metrics[f"{group}/{name}"] = frechet_distance(g, r)
        notes[f"{name}.{group}"] = counts
    return metrics, notes
