"""gRecall and its normalised coverage, identity accuracy, feature similarity, Fréchet distance and buckets on hand-computed cases."""

import numpy as np
import pytest
import torch
from scipy import linalg

from pogdiff.metrics import (
    FRECHET_MIN_SAMPLES,
    assign_buckets,
    bucket_means,
    copies_by_attributes,
    copy_threshold,
    faithful,
    feature_similarity,
    frechet_distance,
    grecall,
    grecall_normalised,
    metric_names,
    nearest_group_gate,
    own_nearest_similarity,
    per_group_mean,
)


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# group 0 has three real images along three axes, group 1 one image
REAL = _unit([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
REAL_IDS = torch.tensor([0, 0, 0, 1])


def test_grecall_counts_distinct_covered_real_images():
    gen = _unit([[1, 0.1, 0, 0], [0.9, 0, 0.1, 0], [0, 1, 0, 0.1], [0, 0, 0, 1]])
    gen_ids = torch.tensor([0, 0, 0, 1])
    r = grecall(REAL, REAL_IDS, gen, gen_ids, 2)
    # group 0: generated images cover real 0 (twice) and real 1 -> 2 / 3; group 1: 1 / 1
    assert r.tolist() == pytest.approx([2 / 3, 1.0])


def test_nearest_gate_drops_images_that_look_like_another_group():
    gen = _unit([[0, 0.1, 0, 1], [0, 0, 1, 0]])  # the first one is nearest to group 1's image
    gen_ids = torch.tensor([0, 0])
    assert nearest_group_gate(REAL, REAL_IDS, gen, gen_ids).tolist() == [False, True]
    assert grecall(REAL, REAL_IDS, gen, gen_ids, 2)[0] == pytest.approx(1 / 3)


def test_judge_mask_replaces_the_gate():
    gen = _unit([[1, 0, 0, 0], [0, 1, 0, 0]])
    gen_ids = torch.tensor([0, 0])
    r = grecall(REAL, REAL_IDS, gen, gen_ids, 2, gen_ok=torch.tensor([False, True]))
    assert r[0] == pytest.approx(1 / 3)
    assert r[1] == 0.0  # real images but nothing generated for it


def test_groups_without_real_images_are_nan_not_zero():
    r = grecall(REAL, REAL_IDS, REAL[:1], torch.tensor([0]), 3)
    assert np.isnan(r[2])


def test_feature_similarity_and_accuracy():
    gen = _unit([[1, 0, 0, 0], [0, 0, 0, 1]])
    gen_ids = torch.tensor([0, 1])
    sim = feature_similarity(REAL, REAL_IDS, gen, gen_ids, 2)
    assert sim.tolist() == pytest.approx([1 / 3, 1.0])
    acc = per_group_mean(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), 2)
    assert acc.tolist() == pytest.approx([0.5, 1.0])


def test_buckets_and_macro_means():
    b = assign_buckets(np.array([150, 30, 31, 10, 9, 1]), many_above=30, few_below=10)
    assert b == ["many", "medium", "many", "medium", "few", "few"]
    means = bucket_means({"grecall": np.array([1.0, 0.5, 0.0, np.nan, 0.2, 0.4])}, b)
    assert means == pytest.approx({"many/grecall": 0.5, "medium/grecall": 0.5, "few/grecall": 0.3, "overall/grecall": 0.42})


def test_empty_bucket_is_left_out():
    means = bucket_means({"accuracy": np.array([1.0, 0.0])}, ["many", "many"])
    assert "few/accuracy" not in means and means["overall/accuracy"] == 0.5


# Two groups, four real images each, on orthogonal axes of an 8-d space: group 0 owns axes
# 0-3, group 1 axes 4-7. A generated image near axis j is nearest to real image j.
AXES = torch.eye(8)
AXES_IDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _near(*axes: int) -> torch.Tensor:
    """Generated images, each mostly along one axis (with a little of the next, so ties cannot occur)."""
    rows = [[1.0 if j == a else 0.1 if j == (a + 1) % 8 else 0.0 for j in range(8)] for a in axes]
    return _unit(rows)


def test_grecall_full_coverage():
    gen = _near(0, 1, 2, 3, 4, 5, 6, 7)
    r = grecall(AXES, AXES_IDS, gen, AXES_IDS, 2)
    assert r.tolist() == [1.0, 1.0]


def test_grecall_half_coverage_counts_each_real_image_once():
    # group 0: four samples but only two distinct real images reached; group 1: two of four
    gen = _near(0, 0, 1, 1, 4, 6)
    r = grecall(AXES, AXES_IDS, gen, torch.tensor([0, 0, 0, 0, 1, 1]), 2)
    assert r.tolist() == [0.5, 0.5]


def test_grecall_gate_rejects_samples_of_the_wrong_identity():
    # group 0 asked for; samples 2 and 3 look like group 1's images (axes 4 and 5) with a trace
    # of group 0's axes 2 and 3: the gate rejects them, so they cover nothing
    wrong = [[0, 0, 0.3, 0, 1, 0, 0, 0], [0, 0, 0, 0.3, 0, 1, 0, 0]]
    gen = torch.cat([_near(0, 1), _unit(wrong)])
    gen_ids = torch.tensor([0, 0, 0, 0])
    assert nearest_group_gate(AXES, AXES_IDS, gen, gen_ids).tolist() == [True, True, False, False]
    assert grecall(AXES, AXES_IDS, gen, gen_ids, 2)[0] == 0.5
    # without the gate they would have covered axes 2 and 3
    assert grecall(AXES, AXES_IDS, gen, gen_ids, 2, gen_ok=torch.ones(4, dtype=torch.bool))[0] == 1.0


def test_grecall_of_an_id_without_generated_images_is_zero():
    gen = _near(0, 1, 2, 3)
    r = grecall(AXES, AXES_IDS, gen, torch.zeros(4, dtype=torch.long), 2)
    assert r.tolist() == [1.0, 0.0]  # group 1 has real images but nothing generated: 0, not NaN
    means = bucket_means({"grecall": r}, ["many", "few"])
    assert means == {"many/grecall": 1.0, "few/grecall": 0.0, "overall/grecall": 0.5}


def test_normalised_coverage_equals_grecall_when_enough_samples_were_drawn():
    # group 0: 6 samples >= 4 real images, reaching axes 0, 1, 2 -> 3 / 4 both ways;
    # group 1: 4 samples = 4 real images, reaching axes 4 and 5 -> 2 / 4 both ways
    gen = _near(0, 0, 1, 1, 2, 2, 4, 4, 5, 5)
    gen_ids = torch.tensor([0] * 6 + [1] * 4)
    raw = grecall(AXES, AXES_IDS, gen, gen_ids, 2)
    assert raw.tolist() == [0.75, 0.5]
    assert grecall_normalised(raw, np.array([4, 4]), np.array([6, 4])).tolist() == [0.75, 0.5]


def test_normalised_coverage_divides_by_what_n_samples_could_cover():
    # group 0: 2 samples for 4 real images, both covered -> raw 2 / 4, normalised 2 / min(2, 4) = 1;
    # group 1: 3 samples, two of them on axis 6 -> raw 2 / 4, normalised 2 / 3
    gen = _near(0, 1, 6, 6, 7)
    gen_ids = torch.tensor([0, 0, 1, 1, 1])
    raw = grecall(AXES, AXES_IDS, gen, gen_ids, 2)
    assert raw.tolist() == [0.5, 0.5]
    norm = grecall_normalised(raw, np.array([4, 4]), np.array([2, 3]))
    assert norm.tolist() == [1.0, pytest.approx(2 / 3)]
    assert (norm > raw).all()
    # NaN (no real images) stays NaN; a group with real images but no samples is an error
    assert np.isnan(grecall_normalised(np.array([np.nan]), np.array([0]), np.array([5]))).all()
    with pytest.raises(ValueError, match="group 1 has 4 real images but no generated ones"):
        grecall_normalised(raw, np.array([4, 4]), np.array([2, 0]))
    with pytest.raises(ValueError, match="shapes differ"):
        grecall_normalised(raw, np.array([4]), np.array([2, 3]))


def _reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root).real)


@pytest.mark.parametrize(("n_a", "n_b", "dim", "shift"), [(200, 150, 16, 0.5), (400, 300, 32, 0.0), (60, 90, 8, 3.0)])
def test_frechet_distance_matches_scipy_reference(n_a, n_b, dim, shift):
    rng = np.random.default_rng(dim)
    mix = rng.normal(size=(dim, dim))  # correlated features, different covariances for a and b
    a = rng.normal(size=(n_a, dim)) @ mix
    b = rng.normal(size=(n_b, dim)) @ (mix + 0.3 * rng.normal(size=(dim, dim))) + shift
    expected = _reference_frechet(a, b)
    assert expected > 0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    # float32 torch tensors are accepted and promoted to float64
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(
        _reference_frechet(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)), rel=1e-6
    )


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 12))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    b = rng.normal(size=(40, 12)) + 1.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    # fewer samples than dimensions: rank-deficient covariances still give the reference value
    c, d = rng.normal(size=(FRECHET_MIN_SAMPLES, 30)), rng.normal(size=(FRECHET_MIN_SAMPLES + 5, 30))
    assert frechet_distance(c, d) == pytest.approx(_reference_frechet(c, d), rel=1e-6)


def test_frechet_distance_rejects_too_few_samples_and_bad_shapes():
    rng = np.random.default_rng(0)
    ok = rng.normal(size=(FRECHET_MIN_SAMPLES, 4))
    with pytest.raises(ValueError, match=f"at least {FRECHET_MIN_SAMPLES} samples per set; features_b has {FRECHET_MIN_SAMPLES - 1}"):
        frechet_distance(ok, ok[:-1])
    with pytest.raises(ValueError, match="min_samples must be >= 2"):
        frechet_distance(ok, ok, min_samples=1)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(ok, rng.normal(size=(FRECHET_MIN_SAMPLES, 5)))
    with pytest.raises(ValueError, match=r"features_a must be \[N, F\]"):
        frechet_distance(ok[0], ok)
    bad = ok.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(ok, bad)


def test_metric_names_keep_display_order_and_ignore_other_keys():
    keys = {"few/frechet_pixels16": 1.0, "overall/grecall": 0.5, "train/loss": 0.1, "many/zeta": 2.0, "few/accuracy": 1.0,
            "overall/separability": 0.9}
    assert metric_names(keys) == ["grecall", "accuracy", "frechet_pixels16", "separability", "zeta"]
    keys["many/grecall_norm"] = 0.7
    assert metric_names(keys) == ["grecall", "grecall_norm", "accuracy", "frechet_pixels16", "separability", "zeta"]


def test_separability_is_normalised_mutual_information():
    from pogdiff.metrics import separability

    prompted = np.array([0, 0, 1, 1, 2, 2])
    assert separability(prompted, prompted) == pytest.approx(1.0)
    assert separability(prompted, np.array([5, 5, 7, 7, 9, 9])) == pytest.approx(1.0)  # consistent misreading still separates
    assert separability(prompted, np.zeros(6)) == 0.0  # one look for every prompt: collapsed
    # two of three individuals merged: I = H(A) = log 3 - 2/3 log 2, H(P) = log 3 -> NMI = 2 I / (H(P) + H(A))
    h_p, h_a = np.log(3), np.log(3) - 2 / 3 * np.log(2)
    assert separability(prompted, np.array([0, 0, 0, 0, 2, 2])) == pytest.approx(2 * h_a / (h_p + h_a))
    assert np.isnan(separability(np.zeros(4), np.arange(4)))  # one prompted individual: undefined


def test_prompt_fidelity_and_attribute_copies_per_image():
    small, large, dark = ("small", "white"), ("large", "white"), ("small", "black")
    asked = [small, large, large, dark, None]
    read = [small, small, None, small, None]
    # 0 shows what was asked; 1 shows a training photo's attributes instead; 2 and 4 are unreadable;
    # 3 shows other attributes, but none of a training photo of its individual (trained on large only)
    assert faithful(read, asked).tolist() == [True, False, False, False, False]
    training = [{small}, {small}, {small}, {large}, {small}]
    assert copies_by_attributes(read, asked, training).tolist() == [False, True, False, False, False]
    with pytest.raises(ValueError, match="2 read attribute tuples for 1 prompts"):
        faithful(read[:2], asked[:1])
    with pytest.raises(ValueError, match="one of each per image"):
        copies_by_attributes(read, asked, training[:4])


def test_copy_threshold_is_a_quantile_of_held_out_photos_similarity_to_their_own_training_photos():
    # group 0 trained on axes 0 and 1, group 1 on axis 3
    held = _unit([[0.6, 0, 0.8, 0], [0, 0.8, 0.6, 0], [1, 0, 0, 1], [0, 0, 1, 0]])
    held_ids = torch.tensor([0, 0, 1, 1])
    s = own_nearest_similarity(held, held_ids, REAL[[0, 1, 3]], torch.tensor([0, 0, 1]))
    # each against its own group only: the third photo is as near group 0's axis 0 as group 1's axis 3
    assert s.tolist() == pytest.approx([0.6, 0.8, 2 ** -0.5, 0.0])
    assert copy_threshold(held, held_ids, REAL[[0, 1, 3]], torch.tensor([0, 0, 1])) == pytest.approx(
        float(np.quantile([0.6, 0.8, 2 ** -0.5, 0.0], 0.95)))
    assert copy_threshold(held, held_ids, REAL[[0, 1, 3]], torch.tensor([0, 0, 1]), quantile=0.5) == pytest.approx(0.65355, abs=1e-5)
    with pytest.raises(ValueError, match="held-out photos of groups that have training images"):
        copy_threshold(held, torch.tensor([0, 0, 1, 2]), REAL[[0, 1, 3]], torch.tensor([0, 0, 1]))
