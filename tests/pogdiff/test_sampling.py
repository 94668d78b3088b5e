"""Exposure balancing: the draw frequencies of each sampling mode, the uniform stream as it always
was, and a resumed run drawing what an uninterrupted one draws (the 2-process DDP run draws with
``repeats``: tests/tasks/test_train_task.py)."""

import pytest
import torch

from pogdiff import trainer
from pogdiff.config import ConfigError, PoGConfig, TrainConfig, parse_config
from pogdiff.demo import train_set
from pogdiff.distributed import Distributed
from pogdiff.phases import NO_PHASES
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.sampling import Exposure, repeat_factors

COUNTS = [100, 30, 10, 3, 1]  # images per individual
GROUP_OF = torch.arange(len(COUNTS)).repeat_interleave(torch.tensor(COUNTS))  # [144]
N = sum(COUNTS)


@pytest.mark.parametrize(("sampling", "factors"), [
    ("uniform", [1, 1, 1, 1, 1]),
    ("repeats", [1, 100 / 30, 10, 10, 10]),  # n_max / n_g, capped at max_repeats = 10
    ("sqrt", [1, 1, (0.1 / (10 / N)) ** 0.5, (0.1 / (3 / N)) ** 0.5, (0.1 / (1 / N)) ** 0.5]),  # max(1, sqrt(t / f_g))
])
def test_draw_frequencies_follow_the_repeat_factors(sampling, factors):
    exposure = Exposure.of(GROUP_OF, sampling, max_repeats=10, threshold=0.1)
    torch.testing.assert_close(exposure.factors, torch.tensor(factors, dtype=torch.float64))
    expected = torch.tensor(factors, dtype=torch.float64) * torch.tensor(COUNTS)
    expected = expected / expected.sum()  # each individual's share of the draws: r_g n_g / sum r n
    draws = 400_000
    rows = exposure.draw(draws, torch.Generator().manual_seed(0))
    assert rows.min() >= 0 and rows.max() < N
    share = torch.bincount(GROUP_OF[rows], minlength=len(COUNTS)).double() / draws
    # binomial standard error at 400k draws is below 0.0008 for every share; 5 of them is the tolerance
    torch.testing.assert_close(share, expected, atol=0.004, rtol=0)
    # within an individual every image is drawn alike: the rarest individual's single image gets its whole share
    per_image = torch.bincount(rows, minlength=N).double() / draws
    torch.testing.assert_close(per_image[GROUP_OF == 2].mean(), expected[2] / 10, atol=0.001, rtol=0)


def test_repeats_without_a_cap_draw_every_individual_equally_often():
    factors = repeat_factors(torch.tensor(COUNTS), "repeats", max_repeats=1e9, threshold=0.1)
    share = factors * torch.tensor(COUNTS)
    torch.testing.assert_close(share, torch.full((5,), 100.0, dtype=torch.float64))


def test_exposure_summary_gives_views_per_image_per_bucket():
    exposure = Exposure.of(GROUP_OF, "repeats", max_repeats=10, threshold=0.1)
    summary = exposure.summary(draws=1000, bucket_of_group=["many", "medium", "few", "few", "few"])
    total = sum(f * n for f, n in zip([1, 100 / 30, 10, 10, 10], COUNTS))
    assert summary["many/views_per_image"] == pytest.approx(1000 / total)
    assert summary["few/views_per_image"] == pytest.approx(10 * 1000 / total)
    assert summary["few/share"] == pytest.approx(10 * 14 / total)
    assert summary["medium/repeat_factor"] == pytest.approx(100 / 30)
    assert sum(summary[f"{b}/share"] for b in ("many", "medium", "few")) == pytest.approx(1.0)


def test_sampling_options_are_checked():
    with pytest.raises(ConfigError, match="config key 'sampling'"):
        parse_config({"sampling": "balanced"}, TrainConfig)
    with pytest.raises(ConfigError, match="config key 'max_repeats'"):
        parse_config({"max_repeats": 0.5}, TrainConfig)
    with pytest.raises(ValueError, match="at least one training image"):
        repeat_factors(torch.tensor([3, 0]), "repeats", 10, 0.1)


@pytest.fixture(scope="module")
def data():
    return train_set.train_data([12, 6, 3, 2, 2, 1], size=16, k=3)


def _rows(run, steps: int) -> list[torch.Tensor]:
    return [trainer._draw(run)[0].idx for _ in range(steps)]


def test_uniform_draws_the_stream_plain_fine_tuning_always_drew(data, tiny_spec, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=8, pog=PoGConfig(method="vanilla"), seed=5)
    run = trainer._setup(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path, False, Distributed(), NO_PHASES)
    gen = torch.Generator().manual_seed(5)
    for rows in _rows(run, 3):
        assert torch.equal(rows, torch.randint(len(data.images), (8,), generator=gen))
        torch.rand(8, generator=gen), torch.randn((8, 3, 16, 16), generator=gen), torch.randint(1000, (8,), generator=gen)


def test_balanced_rows_come_from_the_exposure_and_the_rare_are_drawn_more(data, tiny_spec, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=8, sampling="repeats", pog=PoGConfig(method="vanilla"))
    run = trainer._setup(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path, False, Distributed(), NO_PHASES)
    gen = torch.Generator().manual_seed(0)
    exposure = data.exposure(cfg)
    rows = _rows(run, 200)
    assert torch.equal(rows[0], exposure.draw(8, gen))
    counts = torch.bincount(data.individual_of[torch.cat(rows)], minlength=6)
    # 12 images of the first individual against 1 of the last: repeats = 1 and 10, so 12 : 10 expected
    assert counts[-1] > 0.6 * counts[0]
    uniform = trainer._setup(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg.model_copy(update={"sampling": "uniform"}),
                             tmp_path, False, Distributed(), NO_PHASES)
    plain = torch.bincount(data.individual_of[torch.cat(_rows(uniform, 200))], minlength=6)
    assert plain[-1] < 0.2 * plain[0]  # 1 : 12 expected


@pytest.mark.parametrize("sampling", ["repeats", "sqrt"])
def test_a_resumed_balanced_run_draws_what_an_uninterrupted_one_draws(data, tiny_spec, tmp_path, sampling):
    cfg = TrainConfig(steps=4, batch_size=8, learning_rate=1e-3, checkpoint_every=2, sampling=sampling, pog=PoGConfig(method="vanilla"))
    once = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    first = []
    trainer.train(once, data, cfg, tmp_path / "once", on_step=lambda s, m: first.append(m["loss"]))
    trainer.train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg.model_copy(update={"steps": 2}), tmp_path / "twice")
    again, second = PixelDiffusionPipeline.new(tiny_spec, seed=0), []
    result = trainer.train(again, data, cfg, tmp_path / "twice", on_step=lambda s, m: second.append(m["loss"]))
    assert result.resumed_from == 2
    assert second == first[2:]  # the same batches: the same losses, step for step
    for a, b in zip(once.unet.parameters(), again.unet.parameters()):
        torch.testing.assert_close(a, b)
