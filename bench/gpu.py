"""Everything a GPU user depends on, in one command of at most about 5 minutes on one GPU.

    python -m bench.gpu [--out bench/results/gpu.json]

Writes one JSON document (with the device name) covering:
- ``step_overhead``: seconds per training step of vanilla, PoGDiff dense (every sample borrows) and
  PoGDiff sparse (about 30 % borrow) on a UNet with Stable Diffusion 1.5's architecture (random
  weights, 64 x 64 latents, batch 8, bf16 autocast), and the two ratios to vanilla;
- ``sd_methods``: a tiny SD-format pipeline fine-tuned 20 steps with each method (vanilla, pogdiff,
  cbdm) and sampled under bf16 autocast: the final loss and whether the images are finite;
- ``exact_graph``: the exact top-10 graph and density of 1e6 clustered 384-d captions on the GPU;
- ``demo_retrain``: the demo retrain flow (``python -m flows.cli demo``) with ``POGDIFF_DEVICE=cuda``:
  its exit code, wall time and the tail of its output.

On a machine without CUDA it refuses with one line and exit code 2. Each part records its own error
instead of stopping the others, so one failure does not cost the rest of a short GPU lease.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.knn_graph import clustered
from bench.sdfolder import SD15_UNET, sd_folder
from bench.step_overhead import threshold_for_share
from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.demo import catalogue, train_set
from pogdiff.neighbours import exact_graph
from pogdiff.pipelines.sd import StableDiffusionPipeline
from pogdiff.trainer import TrainData, train

ROOT = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT_S = 180
# pogdiff with every sample borrowing, so the neighbour branch runs on the tiny data
METHODS = {"vanilla": PoGConfig(method="vanilla"), "cbdm": PoGConfig(method="cbdm"),
           "pogdiff": PoGConfig(method="pogdiff", lam=10.0, a=0.0, psi_threshold=0.0, similarity_quantile=0.0)}


def _steps(pipe, data: TrainData, pog: PoGConfig, steps: int, batch: int, folder: str) -> tuple[float, list[float], float]:
    """Median seconds per step after two warm-up steps (CUDA synchronised at each step), the losses,
    and the mean share of samples that borrowed."""
    stamps, losses, shares = [], [], []

    def on_step(step, m):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        losses.append(float(m["loss"]))
        shares.append(float(m.get("psi/active_share", 0.0)))

    cfg = TrainConfig(steps=steps + 2, batch_size=batch, checkpoint_every=10**9, mixed_precision="bf16", pog=pog)
    train(pipe, data, cfg, folder, on_step=on_step)
    return float(np.median(np.diff(stamps[1:]))), losses, float(np.mean(shares))


def step_overhead(tmp: Path, steps: int = 20) -> dict:
    base = sd_folder(tmp / "sd15", image_size=128, unet=SD15_UNET, text_hidden=768)  # VAE / 2: 64 x 64 latents
    data = train_set.train_data(catalogue.longtail_counts(), size=128, k=5)
    sparse = PoGConfig(method="pogdiff")
    sparse = sparse.model_copy(update={"psi_threshold": threshold_for_share(data, sparse, 0.3)})
    variants = {"vanilla": PoGConfig(method="vanilla"),
                "pogdiff_dense": PoGConfig(method="pogdiff", lam=10.0, a=0.0, psi_threshold=0.0, similarity_quantile=0.0),
                "pogdiff_sparse": sparse}
    timed = {name: _steps(StableDiffusionPipeline.from_pretrained(base), data, pog, steps, 8, str(tmp / name))
             for name, pog in variants.items()}
    seconds = {name: t[0] for name, t in timed.items()}
    return {"unet": "stable-diffusion-1.5 architecture, random weights", "latents": [4, 64, 64], "batch": 8,
            "mixed_precision": "bf16", "steps": steps, "seconds_per_step": seconds,
            "borrow_share": {name: t[2] for name, t in timed.items()},
            "dense_ratio": seconds["pogdiff_dense"] / seconds["vanilla"], "sparse_ratio": seconds["pogdiff_sparse"] / seconds["vanilla"]}


def sd_methods(tmp: Path) -> dict:
    base = sd_folder(tmp / "tiny", image_size=16)
    data = train_set.train_data([6, 3, 2, 1], size=16, k=2)
    out = {}
    for method in METHODS:
        pipe = StableDiffusionPipeline.from_pretrained(base)
        _, losses, share = _steps(pipe, data, METHODS[method], 18, 4, str(tmp / f"tiny-{method}"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            images = pipe.generate(["a red circle", "a blue square"], num_inference_steps=10)
        out[method] = {"steps": len(losses), "final_loss": losses[-1], "finite_loss": bool(np.isfinite(losses).all()), "borrow_share": share,
                       "images": list(images.shape), "images_finite": bool(np.isfinite(images.astype(np.float32)).all())}
    return out


def graph_1e6() -> dict:
    x, counts = clustered(1_000_000)
    v, n = torch.from_numpy(x), torch.from_numpy(counts)
    exact_graph(v[:10_000], n[:10_000], 10, 0.05, device="cuda")  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    ids, _, density = exact_graph(v, n, 10, 0.05, device="cuda", block=8192)
    return {"n": 1_000_000, "k": 10, "dim": x.shape[1], "seconds": time.perf_counter() - start,
            "edges": int((ids >= 0).sum()), "density_finite": bool(torch.isfinite(density).all())}


def demo_retrain(tmp: Path) -> dict:
    env = {**os.environ, "POGDIFF_HOME": str(tmp / "home"), "POGDIFF_DEVICE": "cuda", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT_S)
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "output_tail": (proc.stdout + proc.stderr)[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"error: bench.gpu needs a CUDA GPU; torch {torch.__version__} sees none on this machine "
              f"(CUDA build: {torch.version.cuda or 'no, a CPU build'})", file=sys.stderr)
        return 2
    doc = {"bench": "gpu", "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in [("step_overhead", lambda: step_overhead(Path(tmp))), ("sd_methods", lambda: sd_methods(Path(tmp))),
                           ("exact_graph", graph_1e6), ("demo_retrain", lambda: demo_retrain(Path(tmp)))]:
            t = time.perf_counter()
            try:
                doc[name] = part()
            except Exception:  # noqa: BLE001 - recorded in the JSON: the other parts still run on this lease
                doc[name] = {"error": traceback.format_exc()[-3000:]}
            doc[name]["part_seconds"] = time.perf_counter() - t
            print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    doc["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
