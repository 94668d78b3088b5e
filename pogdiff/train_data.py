"""The training set the trainer reads: images, captions, their neighbour graph, and who each image shows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pogdiff.config import TrainConfig
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
