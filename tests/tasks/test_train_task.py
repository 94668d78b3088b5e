"""The train task's DDP path: `accelerate launch` of two CPU processes, followed step by step."""

import json

from pogdiff import demo_train
from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from tasks.train import launch_ddp


def test_launch_ddp_follows_every_step_and_returns_the_model(tiny_spec, tmp_path):
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(tmp_path / "base")
    data = demo_train.train_data([6, 3, 2, 1], size=tiny_spec.image_size, k=2)
    cfg = TrainConfig(base_model=str(tmp_path / "base"), steps=3, batch_size=4, checkpoint_every=2,
                      num_processes=2, pog=PoGConfig(method="pogdiff"))
    seen = []
    summary = launch_ddp(data, cfg, tmp_path / "run", lambda step, m: seen.append((step, m["loss"])))
    assert [s for s, _ in seen] == [1, 2, 3] and all(loss > 0 for _, loss in seen)
    assert summary["steps"] == 3 and summary["world_size"] == 2
    assert load_pipeline(summary["model_dir"]).image_size == tiny_spec.image_size
    # a longer budget resumes the same run folder; only the new steps reach on_step
    seen.clear()
    summary = launch_ddp(data, cfg.model_copy(update={"steps": 4}), tmp_path / "run", lambda step, m: seen.append((step, m["loss"])))
    assert summary["resumed_from"] == 3 and [s for s, _ in seen] == [4]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 4


def test_launch_ddp_reports_the_childs_error(tiny_spec, tmp_path):
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(tmp_path / "base")
    data = demo_train.train_data([3, 2], size=tiny_spec.image_size, k=1)
    cfg = TrainConfig(base_model=str(tmp_path / "base"), steps=2, batch_size=3, num_processes=2)
    try:
        launch_ddp(data, cfg, tmp_path / "run", lambda step, m: None)
    except RuntimeError as err:
        assert "bad training input" in str(err) and "not divisible by the 2 processes" in str(err)
    else:
        raise AssertionError("an odd batch on 2 processes was accepted")
