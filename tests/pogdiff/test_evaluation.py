"""The evaluate stage as a library call: seeded, per bucket, FID left out where too few images; plots."""

import math

import numpy as np
import pytest
from PIL import Image

from pogdiff import demo
from pogdiff.config import EvaluateConfig, parse_config
from pogdiff.evaluation import evaluate
from pogdiff.metrics import FID_MIN_SAMPLES
from pogdiff.model import PixelDiffusionPipeline
from pogdiff.plots import grecall_scatter, metric_bars, save_png

SIZE = 16
# six demo individuals with 12, 12, 5, 5, 2, 2 training images
COUNTS = np.array([12, 12, 5, 5, 2, 2])
CAPTIONS = [ind.caption for ind in demo.all_individuals()[: len(COUNTS)]]


@pytest.fixture(scope="module")
def real():
    rng = np.random.default_rng(0)
    individuals = demo.all_individuals()
    ids = np.repeat(np.arange(len(COUNTS)), COUNTS)
    images = np.stack([demo.render(individuals[i], demo.sample_instance(rng, "full"), SIZE) for i in ids])
    return images, ids


@pytest.fixture(scope="module")
def pipe(tiny_spec):
    return PixelDiffusionPipeline.new(tiny_spec, seed=0)


def _cfg(**over) -> EvaluateConfig:
    base = {"images_per_caption": 6, "num_inference_steps": 2, "batch_size": 16, "gate": "nearest",
            "buckets": {"many_above": 10, "few_below": 3}}
    return parse_config({**base, **over}, EvaluateConfig)


class ReplayGenerator:
    """A perfect memoriser: for caption p it returns p's own training images, cycled to n.

    Implements the pipeline interface evaluate() depends on, so the whole stage can be checked
    against answers known in advance.
    """

    def __init__(self, images: np.ndarray, ids: np.ndarray):
        self.images, self.ids, self.image_size = images, ids, images.shape[1]

    def generate(self, prompts, num_images_per_prompt, seed, guidance_scale, num_inference_steps, batch_size):
        out = []
        for p in range(len(prompts)):
            own = self.images[self.ids == p]
            out.extend(own[j % len(own)] for j in range(num_images_per_prompt))
        return np.stack(out)


def test_same_seed_same_metrics_and_fid_left_out_below_minimum(pipe, real):
    images, ids = real
    cfg = _cfg()
    first = evaluate(pipe, CAPTIONS, COUNTS, images, ids, cfg)
    second = evaluate(pipe, CAPTIONS, COUNTS, images, ids, cfg)
    assert first.metrics == second.metrics
    np.testing.assert_array_equal(first.samples, second.samples)
    assert first.samples.shape == (len(CAPTIONS), 6, SIZE, SIZE, 3)
    other = evaluate(pipe, CAPTIONS, COUNTS, images, ids, _cfg(seed=cfg.seed + 1))
    assert not np.array_equal(other.samples, first.samples)

    per_bucket = ("grecall", "accuracy", "nearest_accuracy", "similarity")
    expected = {f"{b}/{m}" for b in ("many", "medium", "few", "overall") for m in per_bucket}
    # FID: many = 12 generated vs 24 real, medium = 12 vs 10, overall = 36 vs 38 images; few has
    # only 4 real images (< FID_MIN_SAMPLES): no value at all, and the info says why
    assert FID_MIN_SAMPLES == 10
    expected |= {"many/fid", "medium/fid", "overall/fid"}
    assert set(first.metrics) == expected
    assert all(math.isfinite(v) for v in first.metrics.values())
    assert first.metrics["overall/fid"] > 0
    assert first.info["fid.few"] == "left out: 12 generated vs 4 real images, fewer than FID_MIN_SAMPLES=10"
    assert first.info["fid.many"] == "12 generated vs 24 real images"
    assert first.info["gate"] == "nearest" and first.info["feature_extractor"] == "pixels16"
    assert (first.info["images_per_caption"], first.info["seed"]) == (6, cfg.seed)
    # with the nearest-caption gate both accuracies are the same test
    for b in ("many", "medium", "few", "overall"):
        assert first.metrics[f"{b}/accuracy"] == first.metrics[f"{b}/nearest_accuracy"]
    rows = first.per_caption
    assert [r["bucket"] for r in rows] == ["many", "many", "medium", "medium", "few", "few"]
    assert [r["count"] for r in rows] == COUNTS.tolist()


def test_a_perfect_memoriser_scores_full_marks(real):
    images, ids = real
    result = evaluate(ReplayGenerator(images, ids), CAPTIONS, COUNTS, images, ids, _cfg(images_per_caption=12, gate="judge"))
    m = result.metrics
    # every training image is reproduced, so each is its own nearest neighbour: everything covered
    for b in ("many", "medium", "few", "overall"):
        assert m[f"{b}/grecall"] == 1.0
        assert m[f"{b}/nearest_accuracy"] == 1.0
        # the demo's exact detector reads the right individual off every clean render
        assert m[f"{b}/accuracy"] == 1.0
    assert result.info["gate"] == "judge"
    # the many bucket reproduces its 24 images exactly once each: identical sets, FID 0
    assert m["many/fid"] == pytest.approx(0.0, abs=1e-9)
    assert m["overall/fid"] > 0  # rare captions' images repeated: a different distribution


def test_judge_gate_falls_back_to_nearest_when_captions_are_not_demo_captions(real):
    images, ids = real
    captions = [f"product {i}" for i in range(len(COUNTS))]
    result = evaluate(ReplayGenerator(images, ids), captions, COUNTS, images, ids, _cfg(gate="judge"))
    assert result.info["gate"] == "nearest"


def test_mismatched_inputs_are_named(pipe, real):
    images, ids = real
    with pytest.raises(ValueError, match="6 captions but 5 counts"):
        evaluate(pipe, CAPTIONS, COUNTS[:5], images, ids, _cfg())
    with pytest.raises(ValueError, match="real images but"):
        evaluate(pipe, CAPTIONS, COUNTS, images[:-1], ids, _cfg())


def test_plots_write_pngs(tmp_path):
    metrics = {"many/grecall": 0.8, "few/grecall": 0.3, "overall/grecall": 0.5, "overall/fid": 12.0, "train/loss": 0.1}
    bars = save_png(metric_bars(metrics, "title"), tmp_path / "bars.png")
    # one panel per metric (train/loss is not a bucket metric), one bar per bucket that has a value
    fig = metric_bars(metrics)
    assert [ax.get_title() for ax in fig.axes] == ["grecall (higher is better)", "fid (lower is better)"]
    assert [len(ax.patches) for ax in fig.axes] == [3, 1]
    rows = [{"count": 12, "bucket": "many", "grecall": 0.5}, {"count": 2, "bucket": "few", "grecall": None},
            {"count": 3, "bucket": "few", "grecall": 1.0}]
    scatter = grecall_scatter(rows, many_above=10, few_below=3)
    ax = scatter.axes[0]
    assert ax.get_xscale() == "log"
    assert sorted(len(c.get_offsets()) for c in ax.collections) == [1, 1]  # the None row is skipped
    path = save_png(scatter, tmp_path / "sub" / "scatter.png")
    for p in (bars, path):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["bars.png", "scatter.png", "sub"]  # no temp files left
    with pytest.raises(ValueError, match="'<bucket>/<metric>'"):
        metric_bars({"train/loss": 0.1})
    with pytest.raises(ValueError, match="at least one caption"):
        grecall_scatter([{"count": 1, "bucket": "few", "grecall": None}])
