"""Stable Diffusion (latent) path: a tiny SD-format folder is loaded by layout, fine-tuned with each method and sampled."""

import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from bench.sdfolder import sd_folder
from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.demo import train_set
from pogdiff.neighbours import NeighbourGraph
from pogdiff.neighbours import normalised_feature
from pogdiff.pipelines.base import to_uint8
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.pipelines.sd import StableDiffusionPipeline
from pogdiff.trainer import TrainData, train

SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 4 x 8 x 8


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny SD-format folder written by diffusers' own pipeline (the standard model_index.json layout)."""
    return sd_folder(tmp_path_factory.mktemp("sd"), image_size=SIZE)


@pytest.fixture(scope="module")
def data() -> TrainData:
    base = train_set.train_data([6, 3, 2, 1], size=SIZE, k=2)
    # all-zero index features: s_img = 0, so psi > 0 can only come from the latent features
    g = base.graph
    graph = NeighbourGraph.build(g.caption_of, g.nb_ids, g.nb_sims, g.density, torch.zeros(base.images.shape[0], 4))
    return TrainData(base.images, base.captions, graph)


def test_load_pipeline_picks_the_kind_by_layout(sd_dir, tmp_path):
    pipe = load_pipeline(str(sd_dir))
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.image_size == SIZE
    assert isinstance(load_pipeline("builtin:logos16"), PixelDiffusionPipeline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a Stable Diffusion folder"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no Stable Diffusion model at 'nobody/not-cached'"):
        load_pipeline("nobody/not-cached")  # a hub id that is not in the local cache, offline


def test_save_pretrained_round_trips_the_standard_layout(sd_dir, tmp_path):
    pipe = load_pipeline(str(sd_dir))
    pipe.save_pretrained(tmp_path / "copy", extra={"method": "test"})
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["scheduler"] == ["diffusers", "PNDMScheduler"]
    again = load_pipeline(str(tmp_path / "copy"))
    for a, b in [(pipe.unet, again.unet), (pipe.vae, again.vae), (pipe.text_encoder, again.text_encoder)]:
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(v, w), k
    assert again.scheduler.config.skip_prk_steps  # the PNDM-only key survived the DDPM round trip
    # diffusers' own pipeline loads the folder too
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "copy", safety_checker=None)
    assert isinstance(ref.scheduler, PNDMScheduler)


def test_encode_images_is_the_scaled_vae_posterior(sd_dir, data):
    pipe = load_pipeline(str(sd_dir))
    mean, std = pipe.encode_images(data.images, batch_size=5)  # batches of 5 over 12 images
    dist = pipe.vae.encode(data.images).latent_dist
    s = pipe.vae.config.scaling_factor
    assert mean.shape == (len(data.images), 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(mean, dist.mean * s)
    torch.testing.assert_close(std, dist.std * s)
    feats = pipe.image_features(to_uint8(data.images))
    torch.testing.assert_close(feats, normalised_feature(mean), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(feats)))
    hidden, mask = pipe.encode_captions(data.captions + [""])
    assert hidden.shape == (len(data.captions) + 1, 16, 32) and mask is None


@pytest.mark.parametrize("method", ["vanilla", "pogdiff", "cbdm"])
def test_fine_tune_two_steps_and_sample(sd_dir, data, tmp_path, method):
    pipe = load_pipeline(str(sd_dir))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    pog = PoGConfig(method=method, lam=5.0, psi_threshold=0.0, similarity_quantile=0.0, similarity_features="latent")
    seen = []
    r = train(pipe, data, TrainConfig(steps=2, batch_size=4, learning_rate=1e-3, checkpoint_every=1, pog=pog),
              tmp_path / "run", on_step=lambda s, m: seen.append(m))
    assert len(seen) == 2 and all(np.isfinite(m["loss"]) for m in seen)
    if method == "pogdiff":  # the latent features gave s_img > 0 although the index features are all zero
        assert max(m["psi/active_share"] for m in seen) > 0
    if method == "cbdm":
        assert {"term/reg", "term/commit"} <= set(r.final)
    tuned = load_pipeline(str(r.model_dir))
    assert isinstance(tuned, StableDiffusionPipeline)
    assert json.loads((r.model_dir / "pogdiff.json").read_text())["method"] == method
    assert any(not torch.equal(before[k], v) for k, v in tuned.unet.state_dict().items())
    assert all(torch.equal(vae_before[k], v) for k, v in tuned.vae.state_dict().items())  # the VAE stays frozen
    images = tuned.generate(["a red circle", "a blue circle"], num_images_per_prompt=2, seed=1,
                            guidance_scale=7.5, num_inference_steps=3, batch_size=3)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
    again = tuned.generate(["a red circle", "a blue circle"], num_images_per_prompt=2, seed=1,
                           guidance_scale=7.5, num_inference_steps=3, batch_size=4)
    # the batch size never changes the samples: each image's noise depends on its position only, so
    # batches of 3 and 4 differ at most by float summation order, one uint8 step at a rounding edge
    assert np.abs(images.astype(np.int16) - again).max() <= 1


def test_index_features_give_no_borrowing_when_they_are_zero(sd_dir, data, tmp_path):
    # the counterpart of the latent-feature run above: same config, index features (all zero) -> psi = 0
    pipe = load_pipeline(str(sd_dir))
    pog = PoGConfig(method="pogdiff", lam=5.0, psi_threshold=0.0, similarity_quantile=0.0, similarity_features="index")
    r = train(pipe, data, TrainConfig(steps=1, batch_size=4, pog=pog), tmp_path / "run")
    assert r.final["psi/mean"] == 0.0


def test_dpm_solver_samples_the_sd_model(sd_dir):
    pipe = load_pipeline(str(sd_dir))
    images = pipe.generate(["a red circle"], num_images_per_prompt=2, seed=0, num_inference_steps=3, sampler="dpm")
    assert images.shape == (2, SIZE, SIZE, 3)
    assert not np.array_equal(images, pipe.generate(["a red circle"], 2, seed=0, num_inference_steps=3))
