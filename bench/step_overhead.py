"""Step-time overhead of PoGDiff over plain fine-tuning, same model, batch and data.

    python -m bench.step_overhead [--steps 20] [--batch 32] [--spec default|tiny]

Prints one JSON document: seconds per step for vanilla, PoGDiff with every sample borrowing
(dense: psi_threshold = 0, lambda large) and PoGDiff as configured by default (sparse: the
neighbour pass only where psi > threshold), and the ratios to vanilla. The dense ratio's raw limit
is 2.0 (one extra forward, no extra backward: expected about 1.3-1.5).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from pogdiff import demo
from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.model import PixelDiffusionPipeline, UNetSpec, to_tensor
from pogdiff.neighbours import NeighbourGraph, effective_density, knn_graph
from pogdiff.text import load_text_encoder
from pogdiff.trainer import TrainData, train


def _data(size: int) -> TrainData:
    rng = np.random.default_rng(0)
    inds = demo.all_individuals()
    counts = demo.longtail_counts()
    images, caption_of = [], []
    for c, (ind, n) in enumerate(zip(inds, counts)):
        for _ in range(n):
            images.append(demo.render(ind, demo.sample_instance(rng, "full"), size))
            caption_of.append(c)
    captions = [i.caption for i in inds]
    vec = load_text_encoder().embed(captions)
    nb, sims = knn_graph(vec, 5)
    rho = effective_density(vec, torch.tensor(counts, dtype=torch.float32), 0.05)
    x = to_tensor(np.stack(images))
    flat = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    graph = NeighbourGraph.build(torch.tensor(caption_of), nb, sims, rho, torch.nn.functional.normalize(flat, dim=1))
    return TrainData(x, captions, graph)


def _time(spec: UNetSpec, data: TrainData, pog: PoGConfig, steps: int, batch: int, tmp: str) -> tuple[float, float]:
    pipe = PixelDiffusionPipeline.new(spec, seed=0)
    stamps, shares = [], []

    def on_step(step, m):
        stamps.append(time.perf_counter())
        shares.append(m.get("psi/active_share", 0.0))

    cfg = TrainConfig(steps=steps + 2, batch_size=batch, checkpoint_every=10**9, pog=pog)
    train(pipe, data, cfg, f"{tmp}/{pog.method}-{pog.psi_threshold}-{pog.lam}", on_step=on_step)
    per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)  # the first two steps warm up
    return per_step, float(np.mean(shares))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--spec", choices=["default", "tiny"], default="default")
    args = p.parse_args()
    spec = UNetSpec() if args.spec == "default" else UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    data = _data(spec.image_size)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vanilla, _ = _time(spec, data, PoGConfig(method="vanilla"), args.steps, args.batch, tmp)
        dense, dense_share = _time(spec, data, PoGConfig(method="pogdiff", lam=10.0, a=0.0, psi_threshold=0.0), args.steps, args.batch, tmp)
        sparse, sparse_share = _time(spec, data, PoGConfig(method="pogdiff"), args.steps, args.batch, tmp)
    print(json.dumps({
        "bench": "step_overhead",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "spec": args.spec, "batch": args.batch, "steps": args.steps,
        "seconds_per_step": {"vanilla": vanilla, "pogdiff_dense": dense, "pogdiff_sparse": sparse},
        "active_share": {"dense": dense_share, "sparse": sparse_share},
        "ratio": {"dense": dense / vanilla, "sparse": sparse / vanilla},
        "limit": {"dense": 2.0},
    }, indent=2))


if __name__ == "__main__":
    main()
