"""Train task: fine-tune the base model on the indexed dataset with the configured objective.

One process by default; with ``train.num_processes > 1`` the same trainer runs under
``accelerate launch`` (DDP) as a child process, and this task follows its per-step metrics file.
Either way the run's MLflow metrics and a Prefect progress artifact are updated as steps finish.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from pogdiff.config import EvaluateConfig, IndexConfig, TrainConfig
from pogdiff.index import image_extractor
from pogdiff.neighbours import NeighbourGraph
from pogdiff.pipelines.base import TextToImagePipeline, to_tensor
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.process import child_env
from pogdiff.train_data import individual_ids
from pogdiff.trainer import TrainData, train
from storage.mlflow import connection, runs
from storage.mlflow.metric_sink import MetricSink, MetricsNotWritten
from storage.settings import Settings
from storage.training_set import DataVersion, load_training_set
from tasks.describe import EXPOSURE_TAG
from tasks.train_cli import METRICS_FILE, RESULT_FILE, write_train_data

# Exit statuses of tasks.train_cli, as errors a reviewer can act on.
_CHILD_ERRORS = {2: "bad training input", 3: "the loss diverged", 4: "the training time limit ran out"}


def run_dir(settings: Settings, run_id: str) -> Path:
    return runs.run_dir(settings.runs_dir, run_id)  # run ids are hex: never a path outside runs_dir


class _Progress:
    """on_step: every step's metrics to MLflow through ``sink`` (never blocking the step); every 5%
    a log line and the progress artifact."""

    def __init__(self, steps: int, log, sink: MetricSink) -> None:
        self.steps, self.log, self.sink = steps, log, sink
        self.every = max(1, steps // 20)
        self.artifact = create_progress_artifact(0.0, key="training-progress", description=f"training: 0/{steps} steps")

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.sink.log(step, {f"train/{k}": v for k, v in metrics.items()})
        if step % self.every == 0 or step == self.steps:
            self.log.info("train step %d/%d loss %.4f", step, self.steps, metrics["loss"])
            update_progress_artifact(self.artifact, 100.0 * step / self.steps, description=f"training: {step}/{self.steps} steps")


def training_data(settings: Settings, index_cfg: IndexConfig, base_model: str, pipe: TextToImagePipeline,
                  version: DataVersion | None = None, individual_column: str | None = "individual") -> TrainData:
    """The indexed training set at ``version`` (default: as stored now) at ``pipe``'s image size, with each
    image's individual (``metadata[individual_column]``, the unit ``train.sampling`` balances); ``pipe`` is
    ``base_model`` freshly loaded."""
    extractor = image_extractor(index_cfg, loaded={base_model: pipe}).name
    stored = load_training_set(settings.dataset_uri, settings.lancedb_uri, extractor, pipe.image_size, version, individual_column)
    graph = NeighbourGraph.build(
        torch.from_numpy(stored.caption_of),
        torch.from_numpy(stored.nb_index),
        torch.from_numpy(stored.nb_sims),
        torch.from_numpy(stored.density),
        torch.from_numpy(stored.features),
    )
    return TrainData(to_tensor(stored.images), stored.captions, graph, individual_ids(stored.individuals))


def launch_ddp(data: TrainData, cfg: TrainConfig, out: Path, on_step) -> dict:
    """Run ``tasks.train_cli`` under ``accelerate launch`` with ``cfg.num_processes`` processes.

    Follows ``out/metrics.jsonl`` for ``on_step`` while the job runs; returns ``out/result.json``.
    Without a visible GPU the ranks join over gloo on the CPU.
    """
    out.mkdir(parents=True, exist_ok=True)
    write_train_data(out / "train.npz", data)
    (out / "train.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    cmd = [
        sys.executable, "-m", "pogdiff.launch", "--multi_gpu", "--num_processes", str(cfg.num_processes),
        "--num_machines", "1", "--mixed_precision", cfg.mixed_precision, "--dynamo_backend", "no",
        "-m", "tasks.train_cli", "--config", str(out / "train.yaml"), "--data", str(out / "train.npz"), "--out", str(out),
    ]
    metrics_file = out / METRICS_FILE
    seen = metrics_file.stat().st_size if metrics_file.exists() else 0  # lines of an earlier attempt were logged then

    def follow() -> None:
        nonlocal seen
        if not metrics_file.exists():
            return
        with open(metrics_file, encoding="utf-8") as f:
            f.seek(seen)
            for line in f:
                if not line.endswith("\n"):
                    break  # the writer is mid-line; read it next time
                seen += len(line.encode("utf-8"))
                row = json.loads(line)
                on_step(int(row.pop("step")), row)

    with open(out / "launch.log", "ab") as log:
        # pogdiff.launch and its ranks die with this process (pogdiff.process.die_with_parent)
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 env=child_env({**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}))
        while True:
            follow()
            try:
                child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
    follow()
    if child.returncode != 0:
        raise RuntimeError(launch_failure(out / "launch.log", cfg.num_processes, child.returncode))
    return json.loads((out / RESULT_FILE).read_text(encoding="utf-8"))


def launch_failure(log: Path, processes: int, status: int) -> str:
    """One line: what went wrong, from the ranks' ``error: ...`` lines and exit codes in the launcher's log."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    # torch's elastic launcher exits 1 whatever the ranks did; their own exit codes are in its summary
    codes = [int(m.group(1)) for m in map(re.compile(r"exitcode\s*:\s*(-?\d+)").search, lines) if m]
    what = next((_CHILD_ERRORS[c] for c in codes if c in _CHILD_ERRORS), f"exit status {codes[0] if codes else status}")
    errors = list(dict.fromkeys(line.strip() for line in lines if line.startswith("error: ")))
    detail = "; ".join(errors) if errors else "last lines: " + " | ".join(lines[-5:])
    return f"accelerate launch of {processes} processes failed ({what}): {detail} (log: {log})"


# Never cached or retried by Prefect: a retry would restart a long job; resume comes from checkpoints.
@task(name="train")
def train_model(settings: Settings, cfg: TrainConfig, index_cfg: IndexConfig, run_id: str, version: DataVersion,
                evaluate_cfg: EvaluateConfig = EvaluateConfig()) -> str:
    """Fine-tune on the data at ``version`` (the run's recorded lineage); returns the model folder's path.

    ``evaluate_cfg`` names the individual column (the unit ``train.sampling`` balances) and the buckets the
    run's exposure is reported in: ``exposure/<bucket>/{views_per_image,share,repeat_factor}`` metrics and an
    ``exposure`` tag the run description quotes."""
    log = get_run_logger()
    pipe = load_pipeline(cfg.base_model)  # pixel or Stable Diffusion, by the folder's layout
    data = training_data(settings, index_cfg, cfg.base_model, pipe, version, evaluate_cfg.individual_column)
    log.info("train: %d images of snapshot %s (captions table v%d, image features v%d)", len(data.images),
             version.snapshot_id, version.captions_version, version.features_version)
    exposure = data.exposure_summary(cfg, evaluate_cfg.buckets)
    views = ", ".join(f"{k.split('/')[0]} {v:.1f}" for k, v in exposure.items() if k.endswith("/views_per_image"))
    log.info("train: sampling %s, expected views per training image: %s", cfg.sampling, views)
    connection.use(settings)
    out = run_dir(settings, run_id)
    sink = MetricSink(run_id)
    runs.set_tags(run_id, {EXPOSURE_TAG: f"{cfg.sampling} sampling; expected views per training image: {views}"})
    with runs.resume(run_id):  # the active run: MLflow's system metrics sample while training runs
        runs.log_metrics({f"exposure/{k}": v for k, v in exposure.items()})
        try:
            progress = _Progress(cfg.steps, log, sink)
            if cfg.num_processes == 1:
                result = train(pipe, data, cfg, out, on_step=progress)
                summary = {"model_dir": str(result.model_dir), "steps": result.steps, "resumed_from": result.resumed_from,
                           "seconds": result.seconds}
            else:
                del pipe  # each rank loads its own copy
                summary = launch_ddp(data, cfg, out, progress)
            sink.log(summary["steps"], {"train/seconds": summary["seconds"]})
        except BaseException:
            try:
                sink.close(timeout_s=60)  # the steps before the failure still reach the run
            except MetricsNotWritten as err:
                log.warning("train: %s", err)
            raise
        sink.close()  # waits for an MLflow outage to end (up to 10 min): no step's metrics are lost
    if summary["resumed_from"]:
        log.info("train: resumed from checkpoint at step %d", summary["resumed_from"])
    log.info("train: %d steps of %s in %.1f s on %d process(es)", summary["steps"], cfg.pog.method, summary["seconds"], cfg.num_processes)
    return summary["model_dir"]
