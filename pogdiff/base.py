"""Pretraining the embedded base model: the analogue of Stable Diffusion's pretraining.

The base sees a broad, balanced draw of the whole demo domain (``catalogue.balanced_draw``): every
shape in every colour, at every size, position, rotation and background, each image with a caption
in the domain's words ("a small red circle in the upper left on dark navy"). So it can draw anything
of the domain from a description, as Stable Diffusion can draw a mug. It has never seen the
catalogue's product names ("the Vexo logo, ..."): fine-tuning on the long-tailed catalogue must
teach it which look each name stands for, from 150 images for the best seller and a handful for
the rare ones. That is the task whose long tail the benchmark measures.

The recipe is fixed by ``BaseRecipe`` and seeded, so ``pogdiff base build`` reproduces the
committed checkpoint (up to floating-point differences between machines); it resumes from its
last checkpoint when interrupted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.demo import catalogue
from pogdiff.neighbours import NeighbourGraph
from pogdiff.pipelines.base import to_tensor
from pogdiff.pipelines.pixel import PixelDiffusionPipeline, UNetSpec
from pogdiff.trainer import StepCallback, TrainData, TrainResult, train


@dataclass(frozen=True)
class BaseRecipe:
    images: int = 9600
    variation: str = "full"
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 200
    lr_schedule: str = "cosine"
    snr_gamma: float | None = 5.0
    ema_decay: float | None = 0.999
    seed: int = 0
    caption_dropout: float = 0.1
    max_tokens: int = 32  # the longest domain or catalogue caption is 31 MiniLM tokens with [CLS] and [SEP]
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
    images, captions = catalogue.balanced_draw(recipe.images, seed=recipe.seed, size=recipe.spec.image_size, variation=recipe.variation)
    names = sorted(set(captions))
    row = {c: i for i, c in enumerate(names)}
    caption_of = torch.tensor([row[c] for c in captions])
    data = TrainData(to_tensor(images), names, isolated_graph(caption_of, len(names)))
    cfg = TrainConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        lr_warmup_steps=recipe.lr_warmup_steps,
        lr_schedule=recipe.lr_schedule,
        snr_gamma=recipe.snr_gamma,
        ema_decay=recipe.ema_decay,
        seed=recipe.seed,
        caption_dropout=recipe.caption_dropout,
        checkpoint_every=500,
        pog=PoGConfig(method="vanilla"),
    )
    pipe = PixelDiffusionPipeline.new(recipe.spec, seed=recipe.seed, max_tokens=recipe.max_tokens)
    result = train(pipe, data, cfg, out_dir, on_step=on_step)
    build = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": round(result.seconds, 1),  # this attempt's; a resumed build counts from resumed_from
        "resumed_from": result.resumed_from,
    }
    pipe.save_pretrained(result.model_dir, extra={"recipe": asdict(recipe), "method": "pretrain", "build": build})
    return result
