"""Everything a GPU user depends on, in one command of at most about 5 minutes on one GPU.

    python -m bench.gpu [--out bench/results/gpu.json]

Writes one JSON document (with the device name) covering:
- ``step_overhead``: seconds per training step of vanilla, PoGDiff dense (every sample borrows) and
  PoGDiff sparse (about 30 % borrow) on a UNet with Stable Diffusion 1.5's architecture (random
  weights, 64 x 64 latents, batch 8, bf16 autocast), the three trainings' steps interleaved (two
  rounds of 10 timed steps, the order rotated), and the two ratios to vanilla;
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
from bench.step_overhead import DENSE, interleaved, step_variants
from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.demo import folder, train_set
from pogdiff.neighbours import exact_graph
from pogdiff.pipelines.sd import StableDiffusionPipeline
from pogdiff.trainer import TrainData, train

ROOT = Path(__file__).resolve().parent.parent
DEMO_TIMEOUT_S = 180
# pogdiff with every sample borrowing, so the neighbour branch runs on the tiny data
METHODS = {"vanilla": PoGConfig(method="vanilla"), "cbdm": PoGConfig(method="cbdm"),
           "pogdiff": DENSE}


def _losses(pipe, data: TrainData, pog: PoGConfig, steps: int, batch: int, folder: str) -> tuple[list[float], float]:
    """The losses of ``steps`` bf16 training steps, and the mean share of samples that borrowed."""
    losses, shares = [], []

    def on_step(step, m):
        losses.append(float(m["loss"]))
        shares.append(float(m.get("psi/active_share", 0.0)))

    train(pipe, data, TrainConfig(steps=steps, batch_size=batch, checkpoint_every=10**9, mixed_precision="bf16", pog=pog),
          folder, on_step=on_step)
    return losses, float(np.mean(shares))


def step_overhead(tmp: Path, steps: int = 10, rounds: int = 2, unet: dict = SD15_UNET, image_size: int = 128, text_hidden: int = 768,
                  batch: int = 8, mixed_precision: str = "bf16") -> dict:
    """Seconds per step of vanilla, PoGDiff dense and PoGDiff sparse (30 % borrow) on an SD pipeline, the
    variants' steps interleaved round by round as in ``bench.step_overhead`` (so a drift of the GPU's clocks
    or a neighbour's load falls on all three alike), and the ratios of the medians to vanilla."""
    base = sd_folder(tmp / "sd-steps", image_size=image_size, unet=unet, text_hidden=text_hidden)  # latents: image_size / 2
    data = train_set.train_data(folder.longtail_counts(), size=image_size, k=5)
    timed = interleaved(lambda: StableDiffusionPipeline.from_pretrained(base), data, step_variants(data, 0.3), steps, rounds, batch,
                        str(tmp / "steps"), mixed_precision)
    seconds = timed["seconds_per_step"]
    return {"unet": "stable-diffusion-1.5 architecture, random weights" if unet == SD15_UNET else unet,
            "latents": [4, image_size // 2, image_size // 2], "batch": batch, "mixed_precision": mixed_precision,
            "steps": steps, "rounds": rounds, **timed,
            "dense_ratio": seconds["pogdiff_dense"] / seconds["vanilla"], "sparse_ratio": seconds["pogdiff_sparse"] / seconds["vanilla"]}


def sd_methods(tmp: Path) -> dict:
    base = sd_folder(tmp / "tiny", image_size=16)
    data = train_set.train_data([6, 3, 2, 1], size=16, k=2)
    out = {}
    for method in METHODS:
        pipe = StableDiffusionPipeline.from_pretrained(base)
        losses, share = _losses(pipe, data, METHODS[method], 20, 4, str(tmp / f"tiny-{method}"))
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
