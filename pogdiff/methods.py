"""The training methods, one class each: what a method draws per batch beyond the shared data, and its loss.

Every method trains on the same batches from the data stream (image rows, caption dropout, noise,
timesteps: ``Batch``), so comparisons are fair. Whatever a method draws on top (a neighbour caption,
a per-sample weight) comes from the separate neighbour stream and is drawn for the whole global
batch, so DDP ranks stay in step and the data stream never shifts. The loss equations live in
``pogdiff.objectives``; a method decides which predictions feed them.

A new method is one ``Method`` subclass and one ``METHODS`` entry (its name must also be one of the
``train.pog.method`` choices in ``pogdiff.config``; a test keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pogdiff.config import PoGConfig
from pogdiff.neighbours import NeighbourGraph, pick_neighbours, similarity_threshold, weigh_borrowing
from pogdiff.objectives import cbdm_loss, pogdiff_loss, vanilla_loss
from pogdiff.phases import NO_PHASES, Phases

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """The draws every method shares for one global batch of B samples, on the CPU.

    idx ``[B]`` training image rows; caption ``[B]`` their caption ids y; dropped ``[B]`` bool, y
    replaced by the empty caption (classifier-free guidance); t ``[B]`` timesteps.
    """

    idx: torch.Tensor
    caption: torch.Tensor
    dropped: torch.Tensor
    t: torch.Tensor


@dataclass(frozen=True)
class Shard:
    """This rank's b samples of the batch, on the device, after the forward for y.

    xt ``[b, C, H, W]`` = z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps; t ``[b]``; pred ``[b, C, H, W]``
    = f(z_t, y, t) with its gradient; target ``[b, C, H, W]`` = eps or v. ``predict(x, t, captions,
    grad)`` runs the UNet on caption ids ``captions`` ``[b']``: with ``grad`` through the trained
    (under DDP, gradient-synchronised) model, else through the bare UNet without a graph.
    """

    xt: torch.Tensor
    t: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    predict: Callable[..., torch.Tensor]


def quartile_means(values: torch.Tensor, t: torch.Tensor, num_train_timesteps: int, name: str) -> dict[str, float]:
    """Mean of ``values`` ``[B]`` per timestep quartile, keys ``{name}/q1..q4`` (only non-empty ones)."""
    q = (t * 4 // num_train_timesteps).clamp(0, 3)
    out = {}
    for i in range(4):
        sel = q == i
        if sel.any():
            out[f"{name}/q{i + 1}"] = values[sel].float().mean().item()
    return out


def other_captions(captions: torch.Tensor, num_captions: int, generator: torch.Generator) -> torch.Tensor:
    """For each caption id ``[B]``, another drawn uniformly from the other ``num_captions - 1`` ``[B]``
    (the caption itself when it is the only one)."""
    if num_captions < 2:
        return captions.clone()
    other = torch.randint(num_captions - 1, captions.shape, generator=generator)
    return torch.where(other >= captions, other + 1, other)


class Method:
    """One training method: ``draw`` extra per-sample values for a global batch, ``loss`` on a rank's shard.

    ``phases`` times the method's own phases of a step (``pogdiff.phases``; nothing by default).
    """

    def __init__(self, pog: PoGConfig, graph: NeighbourGraph, num_train_timesteps: int, phases: Phases = NO_PHASES):
        self.pog = pog
        self.graph = graph
        self.num_train_timesteps = num_train_timesteps
        self.phases = phases

    def draw(self, batch: Batch, generator: torch.Generator) -> Tensors:
        """Per-sample values ``{name: [B]}`` for the whole global batch, from the neighbour stream
        ``generator``; the trainer passes each rank its shard ``[b]`` of them. Nothing by default."""
        return {}

    def loss(self, shard: Shard, draws: Tensors) -> tuple[Tensors, Tensors]:
        """(terms, report): the per-sample terms ``{"loss": [b], ...}`` of ``pogdiff.objectives``, and
        per-sample values ``{name: [b]}`` that ``metrics`` summarises once gathered over the step."""
        raise NotImplementedError

    def metrics(self, report: Tensors, t: torch.Tensor) -> dict[str, float]:
        """Step metrics from the step's ``report`` values ``{name: [N]}`` and their timesteps ``t`` ``[N]``."""
        return {}


class Vanilla(Method):
    """Plain fine-tuning, L = |f(z_t, y, t) - target|^2; draws nothing."""

    def loss(self, shard: Shard, draws: Tensors) -> tuple[Tensors, Tensors]:
        return vanilla_loss(shard.pred, shard.target), {}


class PoGDiff(Method):
    """PoGDiff: borrow from a neighbouring caption y' in proportion to psi (DESIGN §4).

    form B: L = |pred - target|^2 + psi |pred - nb|^2;  form A: L = |pred - (target + psi nb) / (1 + psi)|^2,
    nb = sg[f(z_t, y', t)] at the same z_t, t, eps. y' and psi ``[B]`` come from
    ``pogdiff.neighbours.draw_borrowing`` (its two phases, ``draw`` and ``psi``, timed apart), with
    tau = the ``similarity_quantile`` of s_img over random pairs of training images.

    The controls (``pog.neighbour``) keep that psi and change only whose prediction is borrowed: ``random``
    swaps y' for a caption drawn uniformly from the others, ``self`` for y itself.
    """

    def __init__(self, pog: PoGConfig, graph: NeighbourGraph, num_train_timesteps: int, phases: Phases = NO_PHASES):
        super().__init__(pog, graph, num_train_timesteps, phases)
        self.tau = similarity_threshold(graph.image_features, graph.caption_of, pog.similarity_quantile)

    def draw(self, batch: Batch, generator: torch.Generator) -> Tensors:
        with self.phases("draw"):
            pick = pick_neighbours(self.graph, batch.idx, batch.dropped, self.pog, self.tau, generator)
        with self.phases("psi"):
            borrow = weigh_borrowing(self.graph, batch.idx, batch.t, pick, self.pog, self.num_train_timesteps)
        nb_caption = borrow.nb_caption
        if self.pog.neighbour == "random":
            nb_caption = torch.where(borrow.active, other_captions(batch.caption, self.graph.num_captions, generator), -1)
        elif self.pog.neighbour == "self":
            nb_caption = torch.where(borrow.active, batch.caption, -1)
        return {"nb_caption": nb_caption, "psi": borrow.psi, "active": borrow.active}

    def loss(self, shard: Shard, draws: Tensors) -> tuple[Tensors, Tensors]:
        psi, active = draws["psi"], draws["active"]
        device = shard.pred.device
        with self.phases("gather_scatter"):
            # Sparse neighbour branch: the extra forward runs only on the rows that borrow (psi > 0).
            nb = shard.pred.detach().clone()
            if active.any():
                a_dev = active.to(device)
                xt, t, caption = shard.xt[a_dev], shard.t[a_dev], draws["nb_caption"][active]
                with self.phases("nb_forward"):
                    out = shard.predict(xt, t, caption, grad=False)
                nb[a_dev] = out
        terms = pogdiff_loss(shard.pred, shard.target, nb, psi.to(device), self.pog.loss_form)
        return terms, {"psi": psi, "active": active.float()}

    def metrics(self, report: Tensors, t: torch.Tensor) -> dict[str, float]:
        psi = report["psi"]
        return {
            "psi/mean": psi.mean().item(),
            "psi/active_share": report["active"].mean().item(),
            **quartile_means(psi, t, self.num_train_timesteps, "psi"),
            "psi/tau": self.tau,
        }


class CBDM(Method):
    """CBDM (Qin et al. 2023, official code), with nb = f(z_t, y', t) keeping its gradient:

    L = |pred - target|^2 + w [ |pred - sg(nb)|^2 + 1/4 |sg(pred) - nb|^2 ],  w = cbdm_tau t / T
    (0 where y was dropped), y' uniform over the other captions.
    """

    def draw(self, batch: Batch, generator: torch.Generator) -> Tensors:
        n = self.graph.num_captions
        with self.phases("draw"):
            # y' uniform over the other captions (the fine-tuning setting of the official code).
            y2 = other_captions(batch.caption, n, generator)
            weight = (self.pog.cbdm_tau * batch.t.float() / self.num_train_timesteps) * (~batch.dropped).float()
        return {"other_caption": y2, "weight": weight}

    def loss(self, shard: Shard, draws: Tensors) -> tuple[Tensors, Tensors]:
        with self.phases("nb_forward"):
            nb = shard.predict(shard.xt, shard.t, draws["other_caption"], grad=True)
        return cbdm_loss(shard.pred, shard.target, nb, draws["weight"].to(shard.pred.device)), {}


METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla,
    "pogdiff": PoGDiff,
    "cbdm": CBDM,
}


def make_method(pog: PoGConfig, graph: NeighbourGraph, num_train_timesteps: int, phases: Phases = NO_PHASES) -> Method:
    """The ``METHODS`` entry named by ``pog.method``, built for ``graph``; a clear error for an unknown name."""
    if pog.method not in METHODS:
        raise ValueError(f"unknown method {pog.method!r}; known: {sorted(METHODS)}")
    return METHODS[pog.method](pog, graph, num_train_timesteps, phases)
