"""The training set the trainer reads: images, captions, their neighbour graph, and who each image shows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pogdiff.config import BucketConfig, TrainConfig
from pogdiff.metrics import assign_buckets
from pogdiff.neighbours import NeighbourGraph
from pogdiff.sampling import Exposure


@dataclass(frozen=True)
class TrainData:
    """In-memory training set. images ``[N, 3, H, W]`` in [-1, 1]; captions ``C`` strings; graph indexes them.

    individual_of ``[N]``: each image's individual, ids 0..G-1 (the unit that ``train.sampling``
    balances); None: each distinct caption is its own individual.
    """

    images: torch.Tensor
    captions: list[str]
    graph: NeighbourGraph
    individual_of: torch.Tensor | None = None

    def __post_init__(self):
        n = self.images.shape[0]
        if n == 0:
            raise ValueError("training set is empty")
        if self.graph.caption_of.shape != (n,):
            raise ValueError(f"caption_of has shape {tuple(self.graph.caption_of.shape)}, expected ({n},)")
        if self.graph.num_captions != len(self.captions):
            raise ValueError(f"graph has {self.graph.num_captions} captions, data has {len(self.captions)}")
        if self.individual_of is not None:
            ids = self.individual_of
            if ids.shape != (n,) or ids.dtype != torch.long:
                raise ValueError(f"individual_of must be int64 [{n}], got {ids.dtype} {tuple(ids.shape)}")
            if (torch.bincount(ids) == 0).any() or ids.min() < 0:
                raise ValueError("individual_of must number the individuals 0..G-1, each with an image")

    @property
    def groups(self) -> torch.Tensor:
        """The exposure unit of each image ``[N]``: its individual, or its caption without individuals."""
        return self.individual_of if self.individual_of is not None else self.graph.caption_of

    def exposure(self, cfg: TrainConfig) -> Exposure:
        """How ``cfg.sampling`` weighs the images (``pogdiff.sampling``)."""
        return Exposure.of(self.groups, cfg.sampling, cfg.max_repeats, cfg.repeat_threshold)

    def exposure_summary(self, cfg: TrainConfig, buckets: BucketConfig) -> dict[str, float]:
        """The exposure ``cfg`` gives each bucket of individuals over the whole run (``Exposure.summary`` over
        steps x batch x accumulation draws), buckets by each individual's image count as evaluation buckets them."""
        counts = torch.bincount(self.groups).numpy()
        draws = cfg.steps * cfg.batch_size * cfg.gradient_accumulation_steps
        return self.exposure(cfg).summary(draws, assign_buckets(counts, buckets.many_above, buckets.few_below))


def individual_ids(names: list[str] | None) -> torch.Tensor | None:
    """``TrainData.individual_of`` from each image's individual name ``[N]``: ids in sorted name order, int64
    ``[N]``; None (balance per caption) where the data names no individuals."""
    if names is None:
        return None
    index = {n: i for i, n in enumerate(sorted(set(names)))}
    return torch.tensor([index[n] for n in names], dtype=torch.long)
