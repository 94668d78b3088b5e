"""Pretraining the embedded base model: the analogue of Stable Diffusion's pretraining.

The base sees a broad, balanced draw of every demo individual in its canonical pose (centred,
medium size, upright, black background), so it knows what each caption's words mean. The demo's
long-tailed fine-tuning set then shows the individuals in varied poses and scenes; how well a
fine-tuned model covers that variety for rare individuals is what gRecall measures.

The recipe is fixed by ``BaseRecipe`` and seeded, so ``pogdiff base build`` reproduces the
committed checkpoint (up to floating-point differences between machines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pogdiff import demo
from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.model import PixelDiffusionPipeline, UNetSpec, to_tensor
from pogdiff.neighbours import NeighbourGraph
from pogdiff.trainer import StepCallback, TrainData, TrainResult, train


@dataclass(frozen=True)
class BaseRecipe:
    images: int = 4800
    variation: str = "canonical"
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    seed: int = 0
    caption_dropout: float = 0.1
    spec: UNetSpec = UNetSpec()


def isolated_graph(caption_of: torch.Tensor, num_captions: int) -> NeighbourGraph:
    """A graph with no neighbours (for vanilla training, where y' is never drawn)."""
    feats = torch.zeros(len(caption_of), 1)
    return NeighbourGraph.build(
        caption_of,
        torch.full((num_captions, 1), -1, dtype=torch.long),
        torch.full((num_captions, 1), float("-inf")),
        torch.ones(num_captions),
        feats,
    )


def build_base(out_dir: Path, recipe: BaseRecipe = BaseRecipe(), on_step: StepCallback | None = None) -> TrainResult:
    """Pretrain a fresh UNet on ``recipe``; the model lands in ``out_dir/model``."""
    images, captions = demo.balanced_draw(recipe.images, seed=recipe.seed, size=recipe.spec.image_size, variation=recipe.variation)
    names = sorted(set(captions))
    row = {c: i for i, c in enumerate(names)}
    caption_of = torch.tensor([row[c] for c in captions])
    data = TrainData(to_tensor(images), names, isolated_graph(caption_of, len(names)))
    cfg = TrainConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        lr_warmup_steps=recipe.lr_warmup_steps,
        seed=recipe.seed,
        caption_dropout=recipe.caption_dropout,
        checkpoint_every=500,
        pog=PoGConfig(method="vanilla"),
    )
    pipe = PixelDiffusionPipeline.new(recipe.spec, seed=recipe.seed)
    result = train(pipe, data, cfg, out_dir, on_step=on_step)
    pipe.save_pretrained(result.model_dir, extra={"recipe": asdict(recipe), "method": "pretrain"})
    return result
