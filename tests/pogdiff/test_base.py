"""The embedded base: its recipe builds, resumes and reloads; the shipped checkpoint knows its domain."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from pogdiff.base import BaseRecipe, build_base
from pogdiff.demo import catalogue, detector
from pogdiff.pipelines.pixel import BUILTIN_MODELS, PixelDiffusionPipeline


def _weights(pipe: PixelDiffusionPipeline) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in pipe.unet.parameters()])


@pytest.mark.slow
def test_a_short_run_of_the_real_recipe_builds_resumes_and_reloads(tmp_path):
    recipe = replace(BaseRecipe(), steps=6, images=48, lr_warmup_steps=2)
    result = build_base(tmp_path, recipe)
    assert result.steps == 6 and result.resumed_from == 0
    meta = json.loads((result.model_dir / "pogdiff.json").read_text())
    assert meta["recipe"] == json.loads(json.dumps(asdict(recipe)))
    assert meta["build"]["device"] == "cpu" and meta["build"]["seconds"] > 0
    assert (meta["image_size"], meta["max_tokens"]) == (16, 32)

    loaded = PixelDiffusionPipeline.from_pretrained(str(result.model_dir))
    fresh = PixelDiffusionPipeline.new(recipe.spec, seed=recipe.seed, max_tokens=recipe.max_tokens)
    assert not torch.equal(_weights(loaded), _weights(fresh))  # it trained
    images = loaded.generate(["a small red circle in the centre on black"], 2, seed=0, guidance_scale=1.0, num_inference_steps=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8

    # a re-run finds the finished checkpoint and writes the same model again
    again = build_base(tmp_path, recipe)
    assert again.resumed_from == 6
    torch.testing.assert_close(_weights(PixelDiffusionPipeline.from_pretrained(str(again.model_dir))), _weights(loaded))


@pytest.mark.slow
def test_the_shipped_base_draws_its_domain_from_words():
    path = BUILTIN_MODELS["builtin:logos16"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    meta = json.loads((path / "pogdiff.json").read_text())
    assert meta["recipe"] == json.loads(json.dumps(asdict(BaseRecipe())))  # built by the committed recipe
    pipe = PixelDiffusionPipeline.from_pretrained("builtin:logos16")
    _, captions = catalogue.balanced_draw(48, seed=123, size=pipe.image_size)
    wanted = [next(i for i in catalogue.all_individuals() if i.description in c) for c in captions]
    found = detector.detect(pipe.generate(captions, 1, seed=0, guidance_scale=1.0, num_inference_steps=10))
    accuracy = np.mean([f == w for f, w in zip(found, wanted)])
    assert accuracy >= 0.9, f"the base draws the captioned shape and colour on {accuracy:.2f} of domain captions"
    # it has never seen a product name: a catalogue caption is not drawn as its product
    products = [i.caption for i in catalogue.all_individuals()]
    named = detector.detect(pipe.generate(products, 1, seed=0, guidance_scale=1.0, num_inference_steps=10))
    assert np.mean([f == i for f, i in zip(named, catalogue.all_individuals())]) <= 0.25
