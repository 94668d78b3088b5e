"""Feature extractors: tiny random DINOv2 / CLIP vision models built from configs, saved, loaded by path."""

import numpy as np
import pytest
import torch
from transformers import BitImageProcessor, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from pogdiff.config import ConfigError, EvaluateConfig, parse_config
from pogdiff.features import PixelFeatures, VisionModelFeatures, make_extractor

CROP = {"height": 32, "width": 32}


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=CROP).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=CROP).save_pretrained(path)
    return path


def _images(n: int, seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(("kind", "folder", "dim"), [("dinov2", "dinov2_dir", 32), ("clip", "clip_dir", 24)])
def test_vision_extractor_shapes_norm_and_determinism(kind, folder, dim, request):
    path = str(request.getfixturevalue(folder))
    extractor = make_extractor(kind, model=path, batch_size=3)
    assert isinstance(extractor, VisionModelFeatures) and extractor.name == f"{kind}:{path}"
    images = _images(7)
    f = extractor(images)
    assert f.shape == (7, dim) and f.dtype == torch.float32
    torch.testing.assert_close(f.norm(dim=1), torch.ones(7))
    # same weights loaded again, other batch boundaries: the same features
    again = make_extractor(kind, model=path, batch_size=5)(images)
    torch.testing.assert_close(f, again, rtol=1e-5, atol=1e-6)
    # features depend on the image, and each image only on itself
    assert not torch.allclose(f[0], f[1])
    torch.testing.assert_close(extractor(images[2:3])[0], f[2], rtol=1e-5, atol=1e-6)
    assert extractor(images[:0]).shape == (0, dim)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        extractor(images[0])


def test_wrong_model_kind_and_missing_model_are_named(dinov2_dir, tmp_path):
    with pytest.raises(ValueError, match="is a 'dinov2' model, not a clip model"):
        make_extractor("clip", model=str(dinov2_dir))
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        make_extractor("dinov2", model=str(missing))
    with pytest.raises(ValueError, match="needs a model"):
        make_extractor("dinov2")
    with pytest.raises(ValueError, match="unknown feature extractor 'inception'"):
        make_extractor("inception")


def test_pixel_extractor_is_the_default_and_exact():
    extractor = make_extractor("pixels", 8)
    assert isinstance(extractor, PixelFeatures) and extractor.name == "pixels8"
    images = _images(4, seed=1)
    f = extractor(images)
    assert f.shape == (4, 8 * 8 * 3)
    assert torch.equal(f, extractor(images))
    torch.testing.assert_close(f.sum(1), torch.zeros(4), atol=1e-5, rtol=0)  # centred per image


def test_evaluate_config_requires_a_model_for_vision_extractors(dinov2_dir):
    cfg = parse_config({"feature_extractor": "dinov2", "feature_model": str(dinov2_dir)}, EvaluateConfig)
    assert cfg.feature_model == str(dinov2_dir)
    with pytest.raises(ConfigError, match="feature_model is required when feature_extractor is 'clip'"):
        parse_config({"feature_extractor": "clip"}, EvaluateConfig)
    with pytest.raises(ConfigError, match="only used by the dinov2 and clip extractors"):
        parse_config({"feature_model": "facebook/dinov2-small"}, EvaluateConfig)
    with pytest.raises(ConfigError, match="feature_extractor"):
        parse_config({"feature_extractor": "inception"}, EvaluateConfig)


def test_unet_feature_sees_identity_is_deterministic_and_keyed_by_the_weights():
    """The embedded base's own UNet tells a product from another of the same colour or shape, which
    pixels cannot; the same image always gives the same feature; other weights give another name."""
    from pogdiff.demo import catalogue
    from pogdiff.features import UNetFeatures
    from pogdiff.pipelines.loader import load_pipeline

    rng = np.random.default_rng(0)
    vexo, same_colour, same_shape = (catalogue.Individual(s, c) for s, c in (("circle", "red"), ("square", "red"), ("circle", "blue")))
    looks = [vexo, same_colour, same_shape]
    images = np.stack([catalogue.render(ind, catalogue.sample_instance(rng, "full"), 16) for ind in looks for _ in range(8)])
    who = np.repeat(np.arange(3), 8)
    pipe = load_pipeline("builtin:logos16")
    extractor = make_extractor("unet", model="builtin:logos16")
    assert isinstance(extractor, UNetFeatures) and extractor.name.startswith("unet:") and extractor.input_size == 16
    f = extractor(images)
    assert f.shape == (24, extractor.dim) and torch.allclose(f.norm(dim=1), torch.ones(24))
    assert torch.equal(f, extractor(images[::-1].copy()).flip(0))  # per image: batch order does not matter
    def nearest_is_same(feats: torch.Tensor) -> float:
        """Leave-one-out: share of images whose most similar other image shows the same product."""
        s = feats @ feats.T
        s.fill_diagonal_(-2.0)
        return float((who[s.argmax(1).numpy()] == who).mean())

    # a red circle among red squares and blue circles: pixels mostly see colour and place
    assert nearest_is_same(f) >= 0.9
    assert nearest_is_same(PixelFeatures(16)(images)) <= 0.75
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(0.01)
    assert UNetFeatures(pipe).name != extractor.name
    with pytest.raises(ValueError, match="'unet' needs the diffusion model"):
        make_extractor("unet")
