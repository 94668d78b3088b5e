"""The evaluate stage as a library call: per individual, seeded, per bucket, FID left out where too few images; plots."""

import json
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pogdiff.config import ConfigError, EvaluateConfig, parse_config
from pogdiff.demo import catalogue, detector
from pogdiff.evaluation import HOLDOUT_SEED_OFFSET, evaluate, images_per_individual
from pogdiff.glossary import evaluated_metrics
from pogdiff.metrics import FRECHET_MIN_SAMPLES
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.plots import grecall_scatter, metric_bars, save_png
from pogdiff.realset import RealSet, group_by_metadata

SIZE = 16
# six demo individuals with 12, 12, 5, 5, 2, 2 training images, each image with its own catalogue caption
COUNTS = np.array([12, 12, 5, 5, 2, 2])
INDIVIDUALS = catalogue.all_individuals()[: len(COUNTS)]
NAMES = [ind.name for ind in INDIVIDUALS]


@pytest.fixture(scope="module")
def real() -> RealSet:
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(len(COUNTS)), COUNTS)
    images, captions = [], []
    for k, i in enumerate(group):
        instance = catalogue.sample_instance(rng, "full")
        images.append(catalogue.render(INDIVIDUALS[i], instance, SIZE))
        captions.append(catalogue.describe(instance, INDIVIDUALS[i].subject, k % 3))
    return RealSet(np.stack(images), captions, group, NAMES)


@pytest.fixture(scope="module")
def pipe(tiny_spec):
    return PixelDiffusionPipeline.new(tiny_spec, seed=0)


def _cfg(**over) -> EvaluateConfig:
    # 8 x 8 pixel features (192-d): the Fréchet distance's eigendecompositions of 768-d covariances would dominate the run time
    base = {"min_images_per_individual": 3, "max_images_per_individual": 8, "num_inference_steps": 2,
            "batch_size": 16, "gate": "nearest", "feature_size": 8, "buckets": {"many_above": 10, "few_below": 3}}
    return parse_config({**base, **over}, EvaluateConfig)


class ReplayGenerator:
    """A perfect memoriser: for a prompt it returns a training image with exactly that caption.

    The k-th time a caption is asked for it returns the k-th of its images (cycling), so a prompt
    list that names every training image once reproduces every training image once. With
    ``first_only`` it always returns the caption's first image instead. Records every call.
    Implements the pipeline interface evaluate() depends on, so the whole stage can be checked
    against answers known in advance.
    """

    def __init__(self, real: RealSet, first_only: bool = False):
        self.images, self.image_size, self.first_only = real.images, real.images.shape[1], first_only
        self.by_caption: dict[str, list[int]] = {}
        for r, c in enumerate(real.captions):
            self.by_caption.setdefault(c, []).append(r)
        self.calls: list[dict] = []

    def generate(self, prompts, num_images_per_prompt, seed, guidance_scale, num_inference_steps, batch_size):
        self.calls.append({"prompts": list(prompts), "num_images_per_prompt": num_images_per_prompt, "seed": seed})
        asked: Counter = Counter()
        out = []
        for p in prompts:
            own = self.by_caption[p]
            k = 0 if self.first_only else asked[p]
            asked[p] += 1
            out.extend(self.images[own[k % len(own)]] for _ in range(num_images_per_prompt))
        return np.stack(out)


def test_images_per_individual_is_clamped_count():
    cfg = _cfg(min_images_per_individual=3, max_images_per_individual=8)
    assert images_per_individual(np.array([1, 3, 5, 8, 40]), cfg).tolist() == [3, 3, 5, 8, 8]
    with pytest.raises(ConfigError, match=r"min_images_per_individual \(9\) must not exceed max_images_per_individual \(8\)"):
        _cfg(min_images_per_individual=9)
    with pytest.raises(ConfigError, match="unknown config key 'images_per_caption'"):
        _cfg(images_per_caption=8)


def test_same_seed_same_metrics_independent_of_batch_size_and_frechet_left_out_below_minimum(pipe, real):
    cfg = _cfg()
    first = evaluate(pipe, real, cfg)
    second = evaluate(pipe, real, _cfg(batch_size=5))  # one flat prompt list: batching changes no draw
    # each image's noise depends on its position only; BLAS kernels sum in a batch-shape (and thread
    # count) dependent order, so pixels may differ by one uint8 step at a rounding edge and the
    # metrics by float rounding, never more
    assert first.prompts == second.prompts
    for a, b in zip(first.samples, second.samples):
        assert np.abs(a.astype(np.int16) - b).max() <= 1
    assert first.metrics == pytest.approx(second.metrics, rel=1e-5, abs=1e-6)
    # N_i = max(3, min(|T_i|, 8))
    assert [s.shape for s in first.samples] == [(n, SIZE, SIZE, 3) for n in (8, 8, 5, 5, 3, 3)]
    other = evaluate(pipe, real, _cfg(seed=cfg.seed + 1))
    assert not np.array_equal(other.samples[0], first.samples[0])

    per_bucket = ("grecall", "grecall_norm", "accuracy", "nearest_accuracy", "similarity")
    expected = {f"{b}/{m}" for b in ("many", "medium", "few", "overall") for m in per_bucket}
    # Fréchet distance on 8x8-pixel features, named after them: many = 16 generated vs 24 real,
    # medium = 10 vs 10, overall = 32 vs 38 images; few has only 4 real images and 6 generated ones
    # (< FRECHET_MIN_SAMPLES): no value at all, and the info says why
    assert FRECHET_MIN_SAMPLES == 10
    expected |= {"many/frechet_pixels8", "medium/frechet_pixels8", "overall/frechet_pixels8", "overall/separability"}
    assert set(first.metrics) == expected
    assert {k.split("/")[1] for k in expected} == set(evaluated_metrics("pixels", 8))  # every one in the glossary
    assert all(math.isfinite(v) for v in first.metrics.values())
    assert first.metrics["overall/frechet_pixels8"] > 0
    assert first.info["frechet_pixels8.few"] == "left out: 6 generated vs 4 real images, fewer than FRECHET_MIN_SAMPLES=10"
    assert first.info["frechet_pixels8.many"] == "16 generated vs 24 real images"
    assert first.info["gate"] == "nearest" and first.info["feature_extractor"] == "pixels8"
    assert first.info["grouped_by"] == "individual" and first.info["individuals"] == 6
    assert (first.info["min_images_per_individual"], first.info["max_images_per_individual"]) == (3, 8)
    assert (first.info["generated_images"], first.info["seed"]) == (32, cfg.seed)
    # with the nearest gate both accuracies are the same test
    for b in ("many", "medium", "few", "overall"):
        assert first.metrics[f"{b}/accuracy"] == first.metrics[f"{b}/nearest_accuracy"]
    rows = first.per_individual
    assert [r["individual"] for r in rows] == NAMES
    assert [r["bucket"] for r in rows] == ["many", "many", "medium", "medium", "few", "few"]
    assert [r["count"] for r in rows] == COUNTS.tolist()
    assert [r["images"] for r in rows] == [8, 8, 5, 5, 3, 3]


def test_prompts_are_drawn_from_each_individuals_own_captions(real):
    gen = ReplayGenerator(real)
    result = evaluate(gen, real, _cfg())
    # one generate call over the flat, individual-major prompt list, one image per prompt
    assert len(gen.calls) == 1 and gen.calls[0]["num_images_per_prompt"] == 1
    assert gen.calls[0]["prompts"] == [p for ps in result.prompts for p in ps]
    for i, n in enumerate((8, 8, 5, 5, 3, 3)):
        members = set(np.flatnonzero(real.group == i).tolist())
        src = result.sources[i].tolist()
        assert len(src) == n and set(src) <= members
        assert result.prompts[i] == [real.captions[r] for r in src]
        if n <= COUNTS[i]:  # a draw without replacement: distinct training images
            assert len(set(src)) == n
        else:  # cycled through a permutation: every image used, evenly
            uses = Counter(src)
            assert set(uses) == members and max(uses.values()) - min(uses.values()) <= 1
        # the memoriser answers each prompt with an image of that caption, which the grid pairs with its source
        for j, r in enumerate(src):
            assert real.captions[r] == result.prompts[i][j]
    # the draw is seeded: the same config draws the same prompts, another seed others
    assert evaluate(ReplayGenerator(real), real, _cfg()).prompts == result.prompts
    assert evaluate(ReplayGenerator(real), real, _cfg(seed=7)).prompts[0] != result.prompts[0]


def test_a_perfect_memoriser_scores_full_marks_with_the_judge(real):
    # N_i = |T_i| for every individual: each training image is asked for once and reproduced once
    cfg = _cfg(min_images_per_individual=2, max_images_per_individual=12, gate="judge")
    result = evaluate(ReplayGenerator(real), real, cfg, judge=detector.judge)
    m = result.metrics
    for b in ("many", "medium", "few", "overall"):
        assert m[f"{b}/grecall"] == 1.0
        assert m[f"{b}/grecall_norm"] == 1.0
        assert m[f"{b}/nearest_accuracy"] == 1.0
        # the demo's exact detector reads the right individual (by its name) off every clean render
        assert m[f"{b}/accuracy"] == 1.0
    assert result.info["gate"] == "judge"
    # the generated images are the training images themselves: identical sets, Fréchet distance 0
    assert m["many/frechet_pixels8"] == pytest.approx(0.0, abs=1e-9)
    assert m["overall/frechet_pixels8"] == pytest.approx(0.0, abs=1e-9)
    assert m["overall/separability"] == pytest.approx(1.0)  # every individual told apart
    # the judge is the caller's: without one the gate is the nearest-individual test, whatever cfg.gate says
    assert evaluate(ReplayGenerator(real), real, cfg).info["gate"] == "nearest"


class CollapsedGenerator(ReplayGenerator):
    """Conditioning erased: whatever the prompt, the same training image."""

    def generate(self, prompts, num_images_per_prompt, seed, guidance_scale, num_inference_steps, batch_size):
        return np.repeat(self.images[:1], len(prompts) * num_images_per_prompt, axis=0)


@pytest.mark.parametrize("gate", ["judge", "nearest"])
def test_separability_shows_a_collapse_of_the_conditioning(real, gate):
    collapsed = evaluate(CollapsedGenerator(real), real, _cfg(gate=gate), judge=detector.judge).metrics
    assert collapsed["overall/separability"] == pytest.approx(0.0, abs=1e-9)
    # the individual the collapsed image shows is still "right" for its own prompts: accuracy alone hides the collapse
    assert collapsed["many/accuracy"] > 0


def test_demo_judge_reads_demo_names_and_abstains_for_others(real):
    images = real.images[[0, 12]]  # one image of individual 0, one of individual 1
    assert detector.judge(images, [NAMES[0], NAMES[1]]) == [NAMES[0], NAMES[1]]
    assert detector.judge(images, [NAMES[0], NAMES[0]]) == [NAMES[0], NAMES[1]]  # what it sees, whatever was asked
    assert detector.judge(images, [NAMES[0], "Acme"]) is None


def test_judge_gate_falls_back_to_nearest_for_names_that_are_not_demo_individuals(real):
    renamed = RealSet(real.images, real.captions, real.group, [f"product {i}" for i in range(len(COUNTS))])
    result = evaluate(ReplayGenerator(renamed), renamed, _cfg(gate="judge"), judge=detector.judge)
    assert result.info["gate"] == "nearest"
    for b in ("many", "medium", "few", "overall"):
        assert result.metrics[f"{b}/accuracy"] == result.metrics[f"{b}/nearest_accuracy"]


# One individual with 12 images under 3 distinct captions (8, 2 and 2 images), one with 3 images
# under 3 captions. Per caption the first would be three small groups; per individual it is one of 12.
SPLIT_CAPTIONS = ["vexo a"] * 8 + ["vexo b"] * 2 + ["vexo c"] * 2 + ["talbrin a", "talbrin b", "talbrin c"]
SPLIT_OWNERS = ["Vexo"] * 12 + ["Talbrin"] * 3


@pytest.fixture(scope="module")
def split_images() -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.stack([catalogue.render(catalogue.individual_named(n), catalogue.sample_instance(rng, "full"), SIZE) for n in SPLIT_OWNERS])


def test_buckets_and_grecall_group_by_individual_not_by_caption(split_images):
    metadata = [json.dumps({"individual": n, "shape": "any"}) for n in SPLIT_OWNERS]
    real = group_by_metadata(split_images, SPLIT_CAPTIONS, metadata, "individual")
    assert real.grouped_by == "individual" and real.names == ["Talbrin", "Vexo"] and real.counts.tolist() == [3, 12]
    # the memoriser answers every prompt with the first image of that caption: Vexo's 12 prompts
    # (all of its captions) reach 3 distinct images of its 12, Talbrin's 3 reach all 3
    cfg = _cfg(min_images_per_individual=1, max_images_per_individual=32, buckets={"many_above": 10, "few_below": 5})
    result = evaluate(ReplayGenerator(real, first_only=True), real, cfg)
    rows = {r["individual"]: r for r in result.per_individual}
    assert len(rows) == 2
    assert rows["Vexo"] | {"similarity": None} == {
        "individual": "Vexo", "count": 12, "bucket": "many", "images": 12, "distinct_captions": 3,
        "grecall": 0.25, "grecall_norm": 0.25, "accuracy": 1.0, "nearest_accuracy": 1.0, "similarity": None}
    assert (rows["Talbrin"]["count"], rows["Talbrin"]["bucket"], rows["Talbrin"]["grecall"]) == (3, "few", 1.0)
    assert result.metrics["many/grecall"] == 0.25 and result.metrics["few/grecall"] == 1.0
    assert "medium/grecall" not in result.metrics


def test_grouping_falls_back_to_captions_when_the_metadata_lacks_the_column(split_images):
    without = [json.dumps({"shape": "any"}) for _ in SPLIT_OWNERS]
    for real in (group_by_metadata(split_images, SPLIT_CAPTIONS, without, "individual"),
                 group_by_metadata(split_images, SPLIT_CAPTIONS, [json.dumps({"individual": n}) for n in SPLIT_OWNERS], None)):
        assert real.grouped_by == "caption"
        assert real.names == sorted(set(SPLIT_CAPTIONS)) and real.counts.tolist() == [1, 1, 1, 8, 2, 2]
    cfg = _cfg(min_images_per_individual=1, max_images_per_individual=32, buckets={"many_above": 10, "few_below": 5})
    result = evaluate(ReplayGenerator(real, first_only=True), real, cfg)
    assert result.info["grouped_by"] == "caption" and len(result.per_individual) == 6
    rows = {r["individual"]: r for r in result.per_individual}
    assert (rows["vexo a"]["count"], rows["vexo a"]["bucket"], rows["vexo a"]["grecall"]) == (8, "medium", 1 / 8)
    # some images naming an individual and others not: no grouping is right, so it is an error
    with pytest.raises(ValueError, match=r"metadata key 'individual' is missing or empty for 1 of 15 images \(e.g. image 14"):
        group_by_metadata(split_images, SPLIT_CAPTIONS, [json.dumps({"individual": n}) for n in SPLIT_OWNERS[:-1]] + ["{}"], "individual")
    with pytest.raises(ValueError, match="metadata of image 0 must be a JSON object"):
        group_by_metadata(split_images, SPLIT_CAPTIONS, ["[]"] * 15, "individual")


def test_gate_metric_note_says_when_raw_few_grecall_is_capped(real):
    ok = evaluate(ReplayGenerator(real), real, _cfg())
    assert "every few individual has N_i >= |T_i|, so there raw == normalised" in ok.info["gate_metric_note"]
    # everything in the few bucket, but at most 4 images each: the 12- and 5-image individuals are capped
    capped = evaluate(ReplayGenerator(real), real, _cfg(min_images_per_individual=2, max_images_per_individual=4,
                                                         buckets={"many_above": 12, "few_below": 13}))
    assert "4 of 6 few individuals have N_i < |T_i|" in capped.info["gate_metric_note"]
    rows = capped.per_individual
    # the memoriser covers 4 distinct images of 12: raw 1/3, normalised 4 / min(4, 12) = 1
    assert (rows[0]["grecall"], rows[0]["grecall_norm"]) == (pytest.approx(1 / 3), 1.0)
    assert (rows[5]["grecall"], rows[5]["grecall_norm"]) == (1.0, 1.0)


def test_mismatched_inputs_are_named(real):
    with pytest.raises(ValueError, match="15 real images, 14 captions and 15 group ids"):
        RealSet(real.images[:15], real.captions[:14], real.group[:15], NAMES)
    with pytest.raises(ValueError, match="individual 'Quorra' has no real images"):
        RealSet(real.images[:24], real.captions[:24], real.group[:24], NAMES[:5])
    with pytest.raises(ValueError, match=r"group ids must be integers in 0\.\.3"):
        RealSet(real.images, real.captions, real.group, NAMES[:4])


def test_plots_write_pngs(tmp_path):
    metrics = {"many/grecall": 0.8, "few/grecall": 0.3, "overall/grecall": 0.5, "overall/fid": 12.0, "train/loss": 0.1}
    bars = save_png(metric_bars(metrics, "title"), tmp_path / "bars.png")
    # one panel per metric (train/loss is not a bucket metric), one bar per bucket that has a value
    fig = metric_bars(metrics)
    assert [ax.get_title() for ax in fig.axes] == ["grecall (higher is better)", "fid (lower is better)"]
    assert [len(ax.patches) for ax in fig.axes] == [3, 1]
    rows = [{"individual": "a", "count": 40, "bucket": "many", "grecall": 0.2, "grecall_norm": 0.25},
            {"individual": "b", "count": 2, "bucket": "few", "grecall": None, "grecall_norm": None},
            {"individual": "c", "count": 3, "bucket": "few", "grecall": 1.0, "grecall_norm": 1.0}]
    scatter = grecall_scatter(rows, many_above=10, few_below=3)
    ax = scatter.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "gRecall per individual"
    # many and few (the None row is skipped), plus one hollow marker where normalised != raw
    assert [len(c.get_offsets()) for c in ax.collections] == [1, 1, 1]
    assert ax.collections[2].get_offsets().tolist() == [[40, 0.25]]
    path = save_png(scatter, tmp_path / "sub" / "scatter.png")
    # every metric: panels wrap three to a row, so the picture stays readable in the MLflow viewer
    names = evaluated_metrics("pixels", 16)
    every = {f"{g}/{m}": 0.5 for g in ("many", "few", "overall") for m in names}
    full = save_png(metric_bars(every, "title"), tmp_path / "all.png")
    assert len(metric_bars(every).axes) == len(names) == 7
    for p in (bars, path, full):
        with Image.open(p) as im:
            assert im.format == "PNG" and 100 < im.size[0] <= 1000
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["all.png", "bars.png", "scatter.png", "sub"]  # no temp files left
    with pytest.raises(ValueError, match="'<bucket>/<metric>'"):
        metric_bars({"train/loss": 0.1})
    with pytest.raises(ValueError, match="at least one row"):
        grecall_scatter([{"count": 1, "bucket": "few", "grecall": None}])


# Held-out prompts, on hand-made 8x8 images. An image's pixel [0, 0, 0] is its code: the attribute
# reader and the judge below read that code alone, so every verdict is fixed in advance.
HELD_SIZE = 8


LOOKS_LIKE = {14: 10}  # held-out photo 14 is training photo 10 but for its code: 10 is 14's nearest neighbour


def _coded(code: int) -> np.ndarray:
    image = np.random.default_rng(LOOKS_LIKE.get(code, code)).integers(0, 256, (HELD_SIZE, HELD_SIZE, 3), dtype=np.uint8)
    image[0, 0, 0] = code
    return image


def _stack(codes) -> np.ndarray:
    return np.stack([_coded(c) for c in codes])


# code -> (individual shown, attributes read); code 99 is unreadable to both
CODES = {10: ("Avo", ("small", "top left", "white")), 11: ("Avo", ("large", "centre", "white")),
         12: ("Avo", ("small", "centre", "black")), 13: ("Avo", ("large", "top left", "black")),
         14: ("Avo", ("medium", "centre", "white")),
         20: ("Bix", ("small", "top left", "white")), 21: ("Bix", ("large", "centre", "black")),
         22: ("Bix", ("medium", "bottom right", "white")), 23: ("Bix", ("large", "top left", "white")),
         30: ("Cor", ("small", "centre", "white")), 31: ("Cor", ("large", "centre", "white"))}


def read_attributes(images: np.ndarray) -> list[tuple[str, ...] | None]:
    return [CODES[c][1] if (c := int(im[0, 0, 0])) in CODES else None for im in images]


def judge_by_code(images: np.ndarray, individuals: list[str]) -> list[str | None]:
    return [CODES[c][0] if (c := int(im[0, 0, 0])) in CODES else None for im in images]


class ChosenGenerator:
    """Answers every prompt with the image chosen for it (``answers[prompt]``: codes, cycled per
    call); records each call."""

    def __init__(self, answers: dict[str, list[int]], images=_stack):
        self.answers, self.images, self.image_size = answers, images, HELD_SIZE
        self.calls: list[dict] = []

    def generate(self, prompts, num_images_per_prompt, seed, guidance_scale, num_inference_steps, batch_size):
        self.calls.append({"prompts": list(prompts), "seed": seed})
        asked: Counter = Counter()
        codes = []
        for p in prompts:
            codes.append(self.answers[p][asked[p] % len(self.answers[p])])
            asked[p] += 1
        return self.images(codes)


# Avo: 3 training photos (many), 2 held out; Bix: 2 training photos (few), 2 held out; Cor: 2 training, none held out
TRAIN_CODES = [10, 11, 12, 20, 21, 30, 31]
HELD_CODES = [13, 14, 22, 23]


def _held_cfg(**over) -> EvaluateConfig:
    base = {"min_images_per_individual": 2, "max_images_per_individual": 4, "num_inference_steps": 1,
            "feature_size": HELD_SIZE, "gate": "judge", "buckets": {"many_above": 2, "few_below": 3}}
    return parse_config({**base, **over}, EvaluateConfig)


def _sets(train_codes=TRAIN_CODES, held_codes=HELD_CODES, images=_stack) -> tuple[RealSet, RealSet]:
    def real(codes, kind):
        names = sorted({CODES[c][0] for c in codes})
        return RealSet(images(codes), [f"{CODES[c][0]} {kind} {c}" for c in codes],
                       np.array([names.index(CODES[c][0]) for c in codes]), names)
    return real(train_codes, "photo"), real(held_codes, "held-out photo")


def test_held_out_prompts_score_accuracy_coverage_fidelity_and_copies_exactly():
    real, holdout = _sets()
    answers = {c: [int(c.rsplit(" ", 1)[1])] for c in real.captions}  # training captions: their own photo
    answers |= {"Avo held-out photo 13": [13],  # shows the prompt
                "Avo held-out photo 14": [10],  # reproduces training photo 10 instead of the prompt
                "Bix held-out photo 22": [22],
                "Bix held-out photo 23": [99]}  # shows nothing: unreadable, rejected by the judge
    gen = ChosenGenerator(answers)
    cfg = _held_cfg()
    result = evaluate(gen, real, cfg, judge=judge_by_code, holdout=holdout, attributes=read_attributes)

    # one extra generate call, over the held-out captions, with noise of its own
    assert len(gen.calls) == 2 and gen.calls[1]["seed"] == cfg.seed + HOLDOUT_SEED_OFFSET != gen.calls[0]["seed"]
    assert Counter(gen.calls[1]["prompts"]) == Counter(holdout.captions)  # M_i = max(2, |H_i|) = 2: each caption once
    m = result.metrics
    # Avo (many): both images show Avo; 13 covers photo 13 and 10 covers 14 (LOOKS_LIKE); 13 shows
    # what was asked, 10 a training photo's attributes
    # Bix (few): 22 accepted and faithful, 99 rejected and unreadable: half of everything, no copy
    assert m["many/holdout_accuracy"] == 1.0 and m["few/holdout_accuracy"] == 0.5 and m["overall/holdout_accuracy"] == 0.75
    assert m["many/holdout_grecall"] == 1.0 and m["few/holdout_grecall"] == 0.5
    assert m["many/prompt_fidelity"] == 0.5 and m["few/prompt_fidelity"] == 0.5
    assert m["many/copy_rate"] == 0.5 and m["few/copy_rate"] == 0.0 and m["overall/copy_rate"] == 0.25
    assert "medium/copy_rate" not in m  # Cor has no held-out photos: no value, not 0
    assert result.info["copy_test"] == "attributes" and result.info["holdout_gate"] == "judge"
    assert (result.info["holdout_photos"], result.info["holdout_generated_images"], result.info["holdout_individuals"]) == (4, 4, 2)
    assert (result.info["holdout_unreadable_photos"], result.info["holdout_unreadable_images"]) == (0, 1)
    held_names = {k.split("/")[1] for k in m} - {k.split("/")[1] for k in evaluate(ChosenGenerator(answers), real, cfg).metrics}
    assert held_names == {"holdout_accuracy", "holdout_grecall", "prompt_fidelity", "copy_rate"}
    assert held_names <= set(evaluated_metrics("pixels", HELD_SIZE, holdout=True))  # every one in the glossary

    rows = {r["individual"]: r for r in result.per_individual}
    assert {k: rows["Bix"][k] for k in ("count", "bucket", "holdout_count", "holdout_images", "holdout_accuracy",
                                        "holdout_grecall", "prompt_fidelity", "copy_rate")} == {
        "count": 2, "bucket": "few", "holdout_count": 2, "holdout_images": 2, "holdout_accuracy": 0.5,
        "holdout_grecall": 0.5, "prompt_fidelity": 0.5, "copy_rate": 0.0}
    assert (rows["Cor"]["holdout_count"], rows["Cor"]["holdout_images"], rows["Cor"]["copy_rate"]) == (0, 0, None)
    # the held-out samples, prompts and sources, one entry per individual as the training ones
    avo = real.names.index("Avo")
    assert [len(s) for s in result.holdout_samples] == [2, 2, 0]
    assert sorted(result.holdout_prompts[avo]) == ["Avo held-out photo 13", "Avo held-out photo 14"]
    for i in range(3):
        assert [holdout.captions[r] for r in result.holdout_sources[i]] == result.holdout_prompts[i]
        codes = [answers[p][0] for p in result.holdout_prompts[i]]
        assert result.holdout_samples[i].shape == (len(codes), HELD_SIZE, HELD_SIZE, 3)
        assert [int(im[0, 0, 0]) for im in result.holdout_samples[i]] == codes


def test_the_copy_test_without_an_attribute_reader_uses_a_threshold_from_real_held_out_photos():
    # zero-mean orthogonal +-1 patterns: an image 128 + 15 (a P1 + b P2 + c P3) has the feature
    # (a, b, c) / |(a, b, c)| in their basis, so every cosine below is known exactly
    rows, cols = np.indices((HELD_SIZE, HELD_SIZE))
    patterns = np.stack([(-1) ** cols, (-1) ** rows, (-1) ** (rows // 2)])
    mix = {10: (1, 0, 0), 20: (0, 0, 1),  # Avo's and Bix's training photos
           13: (3, 4, 0), 14: (4, 3, 0), 22: (0, 1, 1),  # held out: cosines 0.6, 0.8, 1/sqrt(2) to their own training photo
           11: (0, 1, 0)}  # a generated image that resembles no one's training photo (cosine 0)

    def images(codes):
        planes = [128 + 15 * np.tensordot(mix[c], patterns, axes=1) for c in codes]
        return np.repeat(np.stack(planes)[..., None], 3, axis=3).astype(np.uint8)

    real, holdout = _sets([10, 20], [13, 14, 22], images)
    answers = {"Avo photo 10": [10], "Bix photo 20": [20],
               "Avo held-out photo 13": [10], "Avo held-out photo 14": [13],  # a copy of photo 10 (cosine 1), an honest new photo
               "Bix held-out photo 22": [11, 11]}
    cfg = _held_cfg(gate="nearest")
    tau = float(np.quantile([0.6, 0.8, 1 / np.sqrt(2)], 0.95))  # 0.7907: 5 % of real new photos would exceed it
    for reader in (None, lambda ims: [None] * len(ims)):  # a reader that reads none of the photos is no reader
        result = evaluate(ChosenGenerator(answers, images), real, cfg, holdout=holdout, attributes=reader)
        assert result.info["copy_test"] == "feature similarity" and result.info["copy_threshold"] == pytest.approx(tau)
        # Avo: the copy of photo 10 (cosine 1 > tau), photo 13 (0.6) is not; Bix: cosine 0, never
        assert result.metrics["overall/copy_rate"] == 0.25
        assert {r["individual"]: r["copy_rate"] for r in result.per_individual} == {"Avo": 0.5, "Bix": 0.0}
        assert not any(k.endswith("/prompt_fidelity") for k in result.metrics)
    assert result.info["attribute_reader"] == "reads none of the held-out photos: not used"


def test_without_held_out_photos_nothing_changes_and_mismatched_held_out_sets_are_named():
    real, holdout = _sets()
    answers = {c: [int(c.rsplit(" ", 1)[1])] for c in real.captions + holdout.captions}
    plain = evaluate(ChosenGenerator(answers), real, _held_cfg(), judge=judge_by_code)
    with_held = evaluate(ChosenGenerator(answers), real, _held_cfg(), judge=judge_by_code, holdout=holdout,
                         attributes=read_attributes)
    # the training half is the same evaluation: same prompts, images and numbers
    assert with_held.prompts == plain.prompts and all(np.array_equal(a, b) for a, b in zip(with_held.samples, plain.samples))
    assert {k: v for k, v in with_held.metrics.items() if k in plain.metrics} == plain.metrics
    assert plain.holdout_samples == plain.holdout_prompts == plain.holdout_sources == []
    assert all("holdout_count" not in r for r in plain.per_individual) and "copy_test" not in plain.info
    # a perfect generaliser: every held-out caption gets a new photo showing what it asks for
    assert with_held.metrics["overall/prompt_fidelity"] == with_held.metrics["overall/holdout_grecall"] == 1.0
    assert with_held.metrics["overall/copy_rate"] == 0.0

    orphan = RealSet(_stack([13, 40]), ["Avo held-out photo 13", "Dax held-out photo 40"], np.array([0, 1]), ["Avo", "Dax"])
    with pytest.raises(ValueError, match="held-out individual 'Dax' has no training images, so it has no bucket"):
        evaluate(ChosenGenerator(answers), real, _held_cfg(), holdout=orphan)
    by_caption = RealSet(holdout.images, holdout.captions, holdout.group, holdout.names, grouped_by="caption")
    with pytest.raises(ValueError, match="held-out photos are grouped by caption, the training images by individual"):
        evaluate(ChosenGenerator(answers), real, _held_cfg(), holdout=by_caption)
