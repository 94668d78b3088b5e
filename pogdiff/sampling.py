"""Exposure balancing: how often each training image is drawn into a batch (DESIGN §4).

The trainer draws each batch's B rows with replacement from a distribution p over the N training
images. The unit of balance is the individual (a product, a person; each distinct caption where the
data names none): every image of individual g gets the same repeat factor r_g, and

    p_i = r_g(i) / sum_j r_g(j)

- ``uniform``: r_g = 1, p_i = 1 / N. The trainer keeps its plain ``randint`` draw for it, so the
  stream is the one it always drew.
- ``repeats``: r_g = min(n_max / n_g, max_repeats): individual g drawn as if each of its n_g images
  were repeated n_max / n_g times (kohya-ss sd-scripts' per-folder ``num_repeats``, OneTrainer's
  concept balancing), fractions allowed; uncapped, every individual is drawn equally often.
- ``sqrt``: r_g = max(1, sqrt(t / f_g)), f_g = n_g / N, t = ``repeat_threshold`` (LVIS repeat-factor
  sampling, detectron2's ``RepeatFactorTrainingSampler``). Individuals above the share t keep r = 1;
  below it, exposure grows as the square root of their rarity.

detectron2 turns fractional repeat factors into whole repeats per epoch by stochastic rounding; an
i.i.d. draw in proportion to r has the same expected exposure and needs no epochs, so a resumed run
continues the same stream from the saved generator. Pure library code (torch only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from pogdiff.config import Sampling

SAMPLINGS: tuple[Sampling, ...] = get_args(Sampling)


def repeat_factors(counts: torch.Tensor, sampling: Sampling, max_repeats: float, threshold: float) -> torch.Tensor:
    """r_g per individual, float ``[G]`` from its image counts n_g ``[G]`` (all >= 1); see the module's equations."""
    n = counts.double()
    if (n < 1).any():
        raise ValueError("every individual needs at least one training image")
    if sampling == "uniform":
        return torch.ones_like(n)
    if sampling == "repeats":
        return (n.max() / n).clamp(max=max_repeats)
    if sampling == "sqrt":
        return (threshold / (n / n.sum())).sqrt().clamp(min=1.0)
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")


@dataclass(frozen=True)
class Exposure:
    """How a sampling mode weighs N images of G individuals.

    group_of ``[N]`` individual index of each image; factors ``[G]`` r_g; probabilities ``[N]`` p_i
    (sums to 1); cdf ``[N]`` their running sum, which the trainer searches to draw rows.
    """

    group_of: torch.Tensor
    factors: torch.Tensor
    probabilities: torch.Tensor
    cdf: torch.Tensor

    @classmethod
    def of(cls, group_of: torch.Tensor, sampling: Sampling, max_repeats: float, threshold: float) -> "Exposure":
        """The exposure of images whose individuals are ``group_of`` ``[N]`` (ids 0..G-1, each present)."""
        group_of = group_of.long()
        counts = torch.bincount(group_of)
        factors = repeat_factors(counts, sampling, max_repeats, threshold)
        weight = factors[group_of]
        p = weight / weight.sum()
        return cls(group_of, factors, p, torch.cumsum(p, 0))

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` image rows ``[n]`` drawn i.i.d. from p: inverse-CDF of one uniform each (O(n log N), not
        O(N) per batch as ``torch.multinomial`` would be)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u, right=True).clamp_max(len(self.cdf) - 1)

    def views_per_image(self, draws: int) -> torch.Tensor:
        """Expected times each image is drawn in ``draws`` samples (steps x batch x accumulation), float ``[N]``."""
        return self.probabilities * draws

    def summary(self, draws: int, bucket_of_group: list[str]) -> dict[str, float]:
        """Expected exposure per bucket of individuals, for the run's metrics and description:
        ``{"<bucket>/views_per_image": mean over the bucket's images, "<bucket>/share": share of the
        samples drawn from the bucket, "<bucket>/repeat_factor": mean r_g over its individuals}``,
        buckets in first-seen order of ``bucket_of_group`` ``[G]``."""
        views = self.views_per_image(draws)
        bucket_of_image = [bucket_of_group[g] for g in self.group_of.tolist()]
        out: dict[str, float] = {}
        for bucket in dict.fromkeys(bucket_of_group):
            images = torch.tensor([b == bucket for b in bucket_of_image])
            groups = torch.tensor([b == bucket for b in bucket_of_group])
            out[f"{bucket}/views_per_image"] = float(views[images].mean())
            out[f"{bucket}/share"] = float(self.probabilities[images].sum())
            out[f"{bucket}/repeat_factor"] = float(self.factors[groups].mean())
        return out
