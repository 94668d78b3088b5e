"""Ingest throughput against the raw image-processing limit of the same machine.

    python -m bench.ingest [--quick] [--images N] [--workers N]

Generates a folder source of JPEG and PNG images of 256-512 px (smooth gradients and shapes, so
file sizes are realistic) in a temporary folder, then measures:

* ``raw_images_per_s``: plain PIL decode + center crop + resize + PNG encode of the same files, one
  process per worker in a warm pool (its start-up not counted): what the cores can do at most;
* ``pipeline_images_per_s``: ``storage.parquet.ingest`` end to end with the default config (source
  parsing, the checks, hashing, normalisation in a worker-thread pool, Parquet writes, fsync,
  snapshot manifest); ``processes_images_per_s``: the same with spawned worker processes, their
  start-up included.

Prints one JSON document; ``ratio`` = pipeline / raw is compared with the goal limit 0.8.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from storage.config import IngestConfig

GOAL_RATIO = 0.8


def _make_source(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    lines, paths = ["image,caption"], []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(256, 513, size=2))
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        pixels = np.broadcast_to(ramp, (h, w, 3)) + rng.normal(0, 6, (h, w, 3))  # sensor-like noise
        im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(10, 80))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        name = f"{i:05d}.{'jpg' if i % 2 else 'png'}"
        im.save(folder / name, "JPEG" if i % 2 else "PNG", **({"quality": 90} if i % 2 else {}))
        paths.append(folder / name)
        lines.append(f"{name},bench image {i}")
    (folder / IngestConfig().captions_file).write_text("\n".join(lines) + "\n")
    return paths


def _raw_one(path: str, resolution: int) -> int:
    """Plain decode, center crop, resize, encode: the work the pipeline cannot avoid."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        if side > resolution:
            im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        im.save(buffer, "PNG")
    return len(buffer.getvalue())


def _raw(paths: list[Path], resolution: int, workers: int) -> float:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(_raw_one, [str(paths[0])] * workers, [resolution] * workers))  # warm every worker
        started = time.perf_counter()
        list(pool.map(_raw_one, [str(p) for p in paths], [resolution] * len(paths), chunksize=8))
        return len(paths) / (time.perf_counter() - started)


def _pipeline(source: Path, dataset: Path, cfg: IngestConfig, workers: int) -> float:
    # Imported here, as the CLI does: spawned workers re-import the main module, and pyarrow at the
    # top of it would be loaded by every worker.
    from storage.parquet import ingest

    started = time.perf_counter()
    report = ingest(source, dataset, cfg, workers=workers)
    elapsed = time.perf_counter() - started
    if report.accepted != len(list(source.glob("0*"))):
        raise RuntimeError(f"bench source not fully accepted: {report.model_dump()}")
    return report.accepted / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 images instead of 1000, no goal verdict")
    parser.add_argument("--images", type=int, help="number of images (overrides --quick)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    n = args.images or (200 if args.quick else 1000)
    smoke = n < 1000
    cfg = IngestConfig()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        source = Path(tmp) / "source"
        source.mkdir()
        paths = _make_source(source, n)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        raw = _raw(paths, cfg.resolution, args.workers)
        pipeline = _pipeline(source, Path(tmp) / "ds", cfg, args.workers)
        processes = _pipeline(source, Path(tmp) / "ds-processes", cfg.model_copy(update={"parallelism": "processes"}), args.workers)
    ratio = pipeline / raw
    print(
        json.dumps(
            {
                "bench": "ingest",
                "images": n,
                "source_mb": round(mb, 1),
                "workers": args.workers,
                "resolution": cfg.resolution,
                "encoding": cfg.image_encoding,
                "parallelism": cfg.parallelism,
                "raw_images_per_s": round(raw, 1),
                "pipeline_images_per_s": round(pipeline, 1),
                "processes_images_per_s": round(processes, 1),
                "ratio": round(ratio, 3),
                "processes_ratio": round(processes / raw, 3),
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "smoke": smoke,
                # a smoke run (200 images) says the bench runs; the verdict needs the full size
                **({} if smoke else {"goal_ratio": GOAL_RATIO, "meets_goal": ratio >= GOAL_RATIO}),
            }
        )
    )


if __name__ == "__main__":
    main()
