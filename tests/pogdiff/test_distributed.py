"""DDP without a launch: how ranks shard the global batch, the training file the launcher hands the
ranks, the entry point's input checks, and the one line a failed launch becomes (the real 2-process
launches: tests/tasks/test_train_task.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pogdiff.demo import train_set
from pogdiff.distributed import Distributed
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from tasks.train import launch_failure
from tasks.train_cli import main, read_train_data, write_train_data

DATA = Path(__file__).resolve().parents[1] / "data"

CONFIG = {"steps": 3, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2,
          "pog": {"method": "pogdiff", "lam": 5.0, "psi_threshold": 0.0, "similarity_quantile": 0.0}}  # most samples borrow: the ranks run the neighbour branch


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_spec) -> Path:
    """A saved tiny pixel base model, a training set file and a config, as a calling task would write them."""
    root = tmp_path_factory.mktemp("job")
    write_train_data(root / "train.npz", train_set.train_data([6, 3, 2, 1], size=tiny_spec.image_size, k=2))
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(root / "base")
    return root


def _config(job: Path, **over) -> Path:
    path = job / ("train-" + "-".join(f"{k}{v}" for k, v in over.items()) + ".yaml")
    path.write_text(yaml.safe_dump({**CONFIG, "base_model": str(job / "base"), **over}))
    return path


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
    assert torch.equal(back.individual_of, data.individual_of)
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


def test_a_failed_launch_becomes_one_line_with_the_ranks_error(tmp_path):
    """``data/ddp-rank-error.log`` is what a real 2-process ``accelerate launch`` on CPU wrote when both
    ranks refused a global batch of 3: the ranks' ``error:`` lines, then torch's elastic summary, where
    the rank the launcher stopped (exit -15) comes before the root cause (exit 2, bad input)."""
    log = tmp_path / "launch.log"
    log.write_text((DATA / "ddp-rank-error.log").read_text())
    line = launch_failure(log, 2, 1)
    assert line == ("accelerate launch of 2 processes failed (bad training input): "
                    f"error: train.batch_size 3 is not divisible by the 2 processes (log: {log})")
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: connection refused\n")
    assert launch_failure(log, 2, 1) == ("accelerate launch of 2 processes failed (exit status 1): last lines: "
                                         f"Traceback (most recent call last): |   ... | RuntimeError: connection refused (log: {log})")
