"""The demo catalogue as an in-memory ``TrainData``, for tests and benchmarks of the trainer.

What the index stage would compute from the catalogue, without any store: MiniLM caption vectors,
the top-k caption neighbours, the effective density, and mean-centred L2-normalised pixels as the
image feature.
"""

from __future__ import annotations

import numpy as np
import torch

from pogdiff.demo import catalogue
from pogdiff.neighbours import NeighbourGraph, effective_density, knn_graph, normalised_feature
from pogdiff.pipelines.base import to_tensor
from pogdiff.text import load_text_encoder
from pogdiff.trainer import TrainData


def train_data(
    counts: list[int],
    size: int,
    k: int,
    seed: int = 0,
    variation: catalogue.Variation = "full",
    bandwidth: float = 0.05,
    captions: catalogue.CaptionMode = "individual",
) -> TrainData:
    """The first ``len(counts)`` individuals, ``counts[c]`` images each (size x size), with a ``k``-neighbour
    caption graph: images ``[N, 3, size, size]`` in [-1, 1], image features ``[N, 3 * size * size]``,
    individual_of ``[N]`` (individual c of ``counts[c]``)."""
    individuals = catalogue.all_individuals()[: len(counts)]
    rng = np.random.default_rng(seed)
    images, image_captions, individual_of = [], [], []
    for c, (individual, n) in enumerate(zip(individuals, counts)):
        for _ in range(n):
            individual_of.append(c)
            instance = catalogue.sample_instance(rng, variation)
            images.append(catalogue.render(individual, instance, size))
            image_captions.append(catalogue.image_caption(individual, instance, captions, rng))
    names = list(dict.fromkeys(image_captions))  # first appearance: in `individual` mode caption c is individual c
    row = {c: i for i, c in enumerate(names)}
    caption_of = torch.tensor([row[c] for c in image_captions])
    per_caption = torch.bincount(caption_of, minlength=len(names)).float()
    vectors = load_text_encoder().embed(names)
    nb_ids, nb_sims = knn_graph(vectors, k)
    density = effective_density(vectors, per_caption, bandwidth)
    x = to_tensor(np.stack(images))
    graph = NeighbourGraph.build(caption_of, nb_ids, nb_sims, density, normalised_feature(x))
    return TrainData(x, names, graph, torch.tensor(individual_of, dtype=torch.long))
