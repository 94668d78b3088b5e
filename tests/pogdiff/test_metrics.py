"""gRecall, identity accuracy, feature similarity and buckets on hand-computed cases."""

import numpy as np
import pytest
import torch

from pogdiff.metrics import assign_buckets, bucket_means, feature_similarity, grecall, nearest_caption_gate, per_caption_mean


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# caption 0 has three real images along three axes, caption 1 one image
REAL = _unit([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
REAL_IDS = torch.tensor([0, 0, 0, 1])


def test_grecall_counts_distinct_covered_real_images():
    gen = _unit([[1, 0.1, 0, 0], [0.9, 0, 0.1, 0], [0, 1, 0, 0.1], [0, 0, 0, 1]])
    gen_ids = torch.tensor([0, 0, 0, 1])
    r = grecall(REAL, REAL_IDS, gen, gen_ids, 2)
    # caption 0: generated images cover real 0 (twice) and real 1 -> 2 / 3; caption 1: 1 / 1
    assert r.tolist() == pytest.approx([2 / 3, 1.0])


def test_nearest_gate_drops_images_that_look_like_another_caption():
    gen = _unit([[0, 0.1, 0, 1], [0, 0, 1, 0]])  # the first one is nearest to caption 1's image
    gen_ids = torch.tensor([0, 0])
    assert nearest_caption_gate(REAL, REAL_IDS, gen, gen_ids).tolist() == [False, True]
    assert grecall(REAL, REAL_IDS, gen, gen_ids, 2)[0] == pytest.approx(1 / 3)


def test_judge_mask_replaces_the_gate():
    gen = _unit([[1, 0, 0, 0], [0, 1, 0, 0]])
    gen_ids = torch.tensor([0, 0])
    r = grecall(REAL, REAL_IDS, gen, gen_ids, 2, gen_ok=torch.tensor([False, True]))
    assert r[0] == pytest.approx(1 / 3)
    assert r[1] == 0.0  # real images but nothing generated for it


def test_captions_without_real_images_are_nan_not_zero():
    r = grecall(REAL, REAL_IDS, REAL[:1], torch.tensor([0]), 3)
    assert np.isnan(r[2])


def test_feature_similarity_and_accuracy():
    gen = _unit([[1, 0, 0, 0], [0, 0, 0, 1]])
    gen_ids = torch.tensor([0, 1])
    sim = feature_similarity(REAL, REAL_IDS, gen, gen_ids, 2)
    assert sim.tolist() == pytest.approx([1 / 3, 1.0])
    acc = per_caption_mean(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), 2)
    assert acc.tolist() == pytest.approx([0.5, 1.0])


def test_buckets_and_macro_means():
    b = assign_buckets(np.array([150, 30, 31, 10, 9, 1]), many_above=30, few_below=10)
    assert b == ["many", "medium", "many", "medium", "few", "few"]
    means = bucket_means({"grecall": np.array([1.0, 0.5, 0.0, np.nan, 0.2, 0.4])}, b)
    assert means == pytest.approx({"many/grecall": 0.5, "medium/grecall": 0.5, "few/grecall": 0.3, "overall/grecall": 0.42})


def test_empty_bucket_is_left_out():
    means = bucket_means({"accuracy": np.array([1.0, 0.0])}, ["many", "many"])
    assert "few/accuracy" not in means and means["overall/accuracy"] == 0.5
