"""The trainer as a process entry point, for ``accelerate launch`` / ``torchrun`` (DDP) or a plain run.

    accelerate launch --multi_gpu --num_processes 4 -m tasks.train_cli --config train.yaml --data train.npz --out RUN
    torchrun --nproc_per_node 4 -m tasks.train_cli ...        # the same job through torch's launcher
    python -m tasks.train_cli ...                             # one process

``--config`` is a ``TrainConfig`` as YAML (or JSON); ``--data`` a training set written by
``write_train_data``. Every rank trains (``pogdiff.trainer.train``, resuming from RUN/checkpoints);
rank 0 alone writes RUN/model, RUN/checkpoints, RUN/result.json and appends one JSON line per step to
RUN/metrics.jsonl (after a resume, a later line for the same step supersedes an earlier one).
Exit status: 0 done, 2 bad input (one line ``error: ...``), 3 the loss diverged, 4 the time limit ran out
(a checkpoint was written; run again to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pogdiff.atomic import write_atomic, write_text_atomic
from pogdiff.config import ConfigError, TrainConfig, load_config
from pogdiff.neighbours import NeighbourGraph
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.process import die_with_parent, tune_gc
from pogdiff.trainer import TrainData, TrainingDiverged, TrainingTimeLimit, train

DATA_FORMAT = 1
METRICS_FILE = "metrics.jsonl"  # in the run folder: one JSON line per step (rank 0)
RESULT_FILE = "result.json"  # in the run folder: the training summary, written at the end
_ARRAYS = ("images", "captions", "caption_of", "nb_ids", "nb_sims", "density", "image_features")


def write_train_data(path: Path, data: TrainData) -> None:
    """Write ``data`` as one ``.npz`` (no pickled objects), atomically.

    images uint8 ``[N, H, W, 3]`` (exact for images that came from uint8), captions ``[C]`` str,
    caption_of ``[N]``, nb_ids / nb_sims ``[C, k]``, density ``[C]``, image_features ``[N, F]``, and
    individual_of ``[N]`` where the data names individuals.
    """
    g = data.graph
    images = ((data.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    optional = {} if data.individual_of is None else {"individual_of": data.individual_of.numpy()}
    write_atomic(path, lambda f: np.savez(
        f,
        **optional,
        format=np.int64(DATA_FORMAT),
        images=images,
        captions=np.array(data.captions, dtype=str),
        caption_of=g.caption_of.numpy(),
        nb_ids=g.nb_ids.numpy(),
        nb_sims=g.nb_sims.numpy(),
        density=g.density.numpy(),
        image_features=g.image_features.numpy(),
    ))


def read_train_data(path: Path) -> TrainData:
    """Read a file written by ``write_train_data``; a clear error names what is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "format" not in f or int(f["format"]) != DATA_FORMAT:
            raise ValueError(f"{path}: not a pogdiff training data file (format {DATA_FORMAT})")
        missing = [k for k in _ARRAYS if k not in f]
        if missing:
            raise ValueError(f"{path}: training data file lacks {missing}")
        a = {k: f[k] for k in _ARRAYS}
        individual_of = torch.from_numpy(f["individual_of"]).long() if "individual_of" in f else None
    images = torch.from_numpy(a["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    graph = NeighbourGraph.build(
        torch.from_numpy(a["caption_of"]).long(),
        torch.from_numpy(a["nb_ids"]).long(),
        torch.from_numpy(a["nb_sims"]),
        torch.from_numpy(a["density"]),
        torch.from_numpy(a["image_features"]),
    )
    return TrainData(images, [str(c) for c in a["captions"]], graph, individual_of)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.train_cli", description="Fine-tune a text-to-image model (DDP-ready).")
    p.add_argument("--config", required=True, help="TrainConfig as YAML or JSON")
    p.add_argument("--data", required=True, help="training set written by tasks.train_cli.write_train_data")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, model/, result.json, metrics.jsonl")
    p.add_argument("--no-resume", action="store_true", help="start from the base model even if checkpoints exist")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_config(args.config, TrainConfig)
        data = read_train_data(Path(args.data))
        pipe = load_pipeline(cfg.base_model)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / METRICS_FILE, "a", encoding="utf-8") if main_rank else None

    def on_step(step: int, metrics: dict[str, float]) -> None:
        log.write(json.dumps({"step": step, **metrics}) + "\n")
        log.flush()

    try:
        result = train(pipe, data, cfg, out, on_step=on_step if main_rank else None, resume=not args.no_resume)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except TrainingTimeLimit as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if log is not None:
            log.close()
    if main_rank:
        summary = {
            "model_dir": str(result.model_dir), "steps": result.steps, "resumed_from": result.resumed_from,
            "seconds": result.seconds, "final": result.final, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        write_text_atomic(out / RESULT_FILE, json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    die_with_parent()  # a rank never outlives its launcher (pogdiff.launch)
    tune_gc()
    sys.exit(main())
