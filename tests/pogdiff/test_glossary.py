"""The metrics glossary: names that say what they measure, one definition and direction per metric.
The documentation's glossary page is written from it (tests/test_docs.py keeps the two equal)."""

import json

import pytest

from pogdiff.glossary import (
    describe,
    evaluated_metrics,
    frechet_metric,
    glossary,
    glossary_json,
    glossary_list,
    glossary_markdown,
    lower_is_better,
    rank,
)

# what the glossary page (docs/evaluation.md) shows: the default evaluation's metrics (held-out ones included)
# and the other Fréchet features
GLOSSARY_METRICS = (*evaluated_metrics("pixels", 16, holdout=True), "frechet_dinov2", "frechet_clip")
HELD_OUT = ("holdout_accuracy", "holdout_grecall", "prompt_fidelity", "copy_rate")


def test_the_frechet_distance_is_named_after_its_feature():
    assert frechet_metric("pixels", 16) == "frechet_pixels16" and frechet_metric("pixels", 8) == "frechet_pixels8"
    assert frechet_metric("dinov2") == "frechet_dinov2" and frechet_metric("clip") == "frechet_clip"
    assert "fid" not in evaluated_metrics("pixels", 16)  # no extractor here is Inception
    assert "16x16 pixels" in describe("frechet_pixels16").definition
    assert "not Inception" in describe("frechet_dinov2").definition
    with pytest.raises(ValueError, match="feature size"):
        frechet_metric("pixels")
    with pytest.raises(ValueError, match="no Fréchet metric for feature extractor 'inception'"):
        frechet_metric("inception")


def test_every_metric_has_a_definition_and_a_direction():
    for name in GLOSSARY_METRICS:
        info = describe(name)
        assert info.definition and "\n" not in info.definition and info.aggregation
        assert lower_is_better(name) == (name.startswith("frechet_") or name == "copy_rate")
    assert lower_is_better("fid")  # runs logged before the rename still read the right way round
    assert not lower_is_better("zeta")  # unknown: higher, as before the glossary
    with pytest.raises(KeyError, match="no metric 'zeta' in the glossary"):
        describe("zeta")
    with pytest.raises(KeyError, match="frechet_nonsense"):
        describe("frechet_nonsense")
    assert sorted(["separability", "zeta", "frechet_clip", "grecall"], key=rank) == ["grecall", "frechet_clip", "separability", "zeta"]


def test_held_out_metrics_are_named_only_where_the_evaluation_has_held_out_photos():
    plain, held = evaluated_metrics("pixels", 16), evaluated_metrics("pixels", 16, holdout=True)
    assert not set(HELD_OUT) & set(plain)
    assert held == (*plain, *HELD_OUT)  # after the training-prompt metrics, in this order
    assert describe("copy_rate").direction == "lower" and "95th percentile" in describe("copy_rate").definition
    assert all("held-out photos" in describe(m).aggregation for m in HELD_OUT)


def test_the_glossary_of_a_run_in_json_and_markdown():
    keys = ["many/grecall", "few/grecall", "overall/frechet_pixels16", "overall/separability", "train/loss"]
    data = json.loads(glossary_json(keys))
    assert data == glossary(keys)
    assert list(data["metrics"]) == ["grecall", "frechet_pixels16", "separability"]  # train/loss is no evaluation metric
    assert data["metrics"]["frechet_pixels16"]["direction"] == "lower"
    assert "pooled" in data["metrics"]["frechet_pixels16"]["aggregation"]
    assert "mean over" in data["metrics"]["grecall"]["aggregation"]
    assert "tr(S_g)/N_g" in data["overall_vs_buckets"]
    md = glossary_markdown(keys)
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all(line.count(" | ") == 3 for line in rows)  # |T_i| is escaped, not a cell border
    assert "- `frechet_pixels16` (lower is better): Fréchet distance" in glossary_list(keys)
