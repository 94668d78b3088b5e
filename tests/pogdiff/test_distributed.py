"""DDP: the trainer under a real 2-process ``accelerate launch`` on CPU (gloo), and its entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from localserver import free_port

from pogdiff import demo_train
from pogdiff.config import TrainConfig
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.distributed import Distributed
from pogdiff.trainer import train
from tasks.train_cli import main, read_train_data, write_train_data

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"steps": 3, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2,
          "pog": {"method": "pogdiff", "lam": 5.0, "psi_threshold": 0.0, "similarity_quantile": 0.0}}  # most samples borrow: the ranks run the neighbour branch


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_spec) -> Path:
    """A saved tiny pixel base model, a training set file and a config, as a calling task would write them."""
    root = tmp_path_factory.mktemp("job")
    write_train_data(root / "train.npz", demo_train.train_data([6, 3, 2, 1], size=tiny_spec.image_size, k=2))
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(root / "base")
    return root


def _config(job: Path, **over) -> Path:
    path = job / ("train-" + "-".join(f"{k}{v}" for k, v in over.items()) + ".yaml")
    path.write_text(yaml.safe_dump({**CONFIG, "base_model": str(job / "base"), **over}))
    return path


def _launch(job: Path, config: Path, out: Path) -> subprocess.CompletedProcess:
    # --multi_gpu is accelerate's DDP launcher (torch.distributed.run); with no visible GPU the
    # trainer joins with gloo on CPU. (accelerate's --cpu alone starts a single process.)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "tasks.train_cli", "--config", str(config), "--data", str(job / "train.npz"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_two_process_accelerate_launch_trains_like_one_process_and_resumes(job, tmp_path):
    out = tmp_path / "ddp"
    first = _launch(job, _config(job), out)
    assert first.returncode == 0, first.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 3 and result["resumed_from"] == 0
    assert sorted(p.name for p in out.iterdir()) == [".writer.lock", "checkpoints", "metrics.jsonl", "model", "result.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone reports

    again = _launch(job, _config(job, steps=5), out)  # a longer budget resumes from step 3
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 3
    ddp_log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_log] == [1, 2, 3, 4, 5]

    # The same job in one process: each rank trained its half of every batch and the gradients were
    # averaged, so losses (gathered over both ranks) and weights match up to float summation order.
    single = []
    pipe = load_pipeline(str(job / "base"))
    cfg = TrainConfig.model_validate({**CONFIG, "steps": 5})
    train(pipe, read_train_data(job / "train.npz"), cfg, tmp_path / "single", on_step=lambda s, m: single.append(m))
    for d, s in zip(ddp_log, single, strict=True):
        assert d["psi/active_share"] == s["psi/active_share"]
        np.testing.assert_allclose([d["loss"], d["term/pog"], d["grad_norm"]], [s["loss"], s["term/pog"], s["grad_norm"]], rtol=1e-4)
    assert max(d["psi/active_share"] for d in ddp_log) > 0  # the ranks did run the neighbour branch
    ddp_unet = load_pipeline(str(out / "model")).unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(ddp_unet[k], v, atol=1e-5, rtol=1e-4)


def test_each_launched_rank_takes_a_shard_of_the_global_batch(job, tmp_path):
    # a global batch of 3 cannot be split over 2 ranks: both ranks refuse before any step
    run = _launch(job, _config(job, batch_size=3), tmp_path / "odd")
    assert run.returncode != 0
    assert "error: train.batch_size 3 is not divisible by the 2 processes" in run.stderr
    assert not (tmp_path / "odd" / "model").exists()


def test_shards_split_the_global_batch_evenly():
    assert [Distributed(rank=r, world=4).shard(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert Distributed().shard(7) == slice(0, 7)
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 processes"):
        Distributed(rank=0, world=4).shard(6)


def test_training_file_round_trips_exactly(job, tmp_path):
    data = read_train_data(job / "train.npz")
    write_train_data(tmp_path / "copy.npz", data)
    back = read_train_data(tmp_path / "copy.npz")
    assert torch.equal(back.images, data.images) and back.captions == data.captions
    for name in ("caption_of", "nb_ids", "nb_sims", "density", "image_features", "members", "offsets"):
        assert torch.equal(getattr(back.graph, name), getattr(data.graph, name)), name
    np.savez(tmp_path / "other.npz", images=np.zeros(1))
    with pytest.raises(ValueError, match="not a pogdiff training data file"):
        read_train_data(tmp_path / "other.npz")


def test_entry_point_reports_bad_input_in_one_line(job, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base_model": str(job / "base"), "pog": {"lamda": 2}}))
    assert main(["--config", str(bad), "--data", str(job / "train.npz"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown config key 'pog.lamda'"
    assert main(["--config", str(_config(job)), "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "run")]) == 2
    assert "training data file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the inputs are valid
