"""The train task's DDP path: ``launch_ddp`` runs ``tasks.train_cli`` under a real 2-process
``accelerate launch`` on CPU (gloo), follows it step by step and resumes it.

The launches are the expensive part of the suite's DDP coverage, so there are two: the first
training and its resume. Sharding, the entry point's input checks and how a failed launch is
reported are unit tests in tests/pogdiff/test_distributed.py.
"""

import json

import numpy as np
import pytest
import torch

from pogdiff.config import TrainConfig
from pogdiff.demo import train_set
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.trainer import train
from tasks.train import launch_ddp

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

# Most samples borrow, so the ranks run the neighbour branch; rows are drawn by exposure balancing, so
# the match with one process below shows that every rank draws the same balanced batches, resumed too.
CONFIG = {"steps": 3, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2, "num_processes": 2, "sampling": "repeats",
          "pog": {"method": "pogdiff", "lam": 5.0, "psi_threshold": 0.0, "similarity_quantile": 0.0}}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_spec):
    path = tmp_path_factory.mktemp("ddp") / "base"
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(path)
    return path


def test_two_processes_train_like_one_follow_every_step_and_resume(base, tmp_path):
    data = train_set.train_data([6, 3, 2, 1], size=16, k=2)
    cfg = TrainConfig.model_validate({**CONFIG, "base_model": str(base)})
    out, seen = tmp_path / "ddp", []
    summary = launch_ddp(data, cfg, out, lambda step, m: seen.append((step, m["loss"])))
    assert [s for s, _ in seen] == [1, 2, 3] and all(loss > 0 for _, loss in seen)
    assert (summary["steps"], summary["world_size"], summary["resumed_from"]) == (3, 2, 0)
    assert load_pipeline(summary["model_dir"]).image_size == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone reports

    # a longer budget resumes the same run folder; only the new steps reach on_step
    seen.clear()
    summary = launch_ddp(data, cfg.model_copy(update={"steps": 5}), out, lambda step, m: seen.append((step, m["loss"])))
    assert summary["resumed_from"] == 3 and [s for s, _ in seen] == [4, 5]
    assert json.loads((out / "result.json").read_text())["steps"] == 5
    ddp_log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_log] == [1, 2, 3, 4, 5]

    # The same job in one process: each rank trained its half of every batch and the gradients were
    # averaged, so losses (gathered over both ranks) and weights match up to float summation order.
    single = []
    pipe = load_pipeline(str(base))
    train(pipe, data, cfg.model_copy(update={"steps": 5, "num_processes": 1}), tmp_path / "single", on_step=lambda s, m: single.append(m))
    for d, s in zip(ddp_log, single, strict=True):
        assert d["psi/active_share"] == s["psi/active_share"]
        np.testing.assert_allclose([d["loss"], d["term/pog"], d["grad_norm"]], [s["loss"], s["term/pog"], s["grad_norm"]], rtol=1e-4)
    assert max(d["psi/active_share"] for d in ddp_log) > 0  # the ranks did run the neighbour branch
    ddp_unet = load_pipeline(str(out / "model")).unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(ddp_unet[k], v, atol=1e-5, rtol=1e-4)
