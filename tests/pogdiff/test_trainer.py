"""The trainer: psi = 0 is plain fine-tuning, the sparse neighbour branch, resume, the NaN guard."""

import numpy as np
import pytest
import torch

from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.demo import train_set
from pogdiff.optim import EMA, lr_factor
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.trainer import TrainData, TrainingDiverged, TrainingTimeLimit, stepper, train


@pytest.fixture(scope="module")
def data() -> TrainData:
    return train_set.train_data([12, 6, 3, 2, 2, 1], size=16, k=3)


def _cfg(steps=3, **pog):
    return TrainConfig(steps=steps, batch_size=8, learning_rate=1e-3, checkpoint_every=2, pog=PoGConfig(**pog))


def _weights(pipe):
    return torch.cat([p.detach().flatten() for p in pipe.unet.parameters()])


@pytest.mark.parametrize("neighbour", ["graph", "random", "self"])
def test_pogdiff_with_zero_lambda_is_exactly_vanilla(data, tiny_spec, tmp_path, neighbour):
    a = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    b = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    ra = train(a, data, _cfg(method="vanilla"), tmp_path / "a")
    rb = train(b, data, _cfg(method="pogdiff", lam=0.0, neighbour=neighbour), tmp_path / "b")
    assert torch.equal(_weights(a), _weights(b))
    assert ra.final["loss"] == rb.final["loss"]
    assert rb.final["psi/active_share"] == 0.0


def test_neighbour_branch_runs_only_on_active_samples(data, tiny_spec, tmp_path):
    pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    sizes = []
    pipe.unet.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    active = []
    # a = 0 makes psi depend on density only, so a threshold between the rare and common psi splits the batch
    train(pipe, data, _cfg(steps=4, method="pogdiff", lam=1.0, a=0.0, psi_threshold=0.9),
          tmp_path / "run", on_step=lambda s, m: active.append(round(m["psi/active_share"] * 8)))
    # per step: the batch forward (8), then one forward over exactly the active samples, if any
    expected = [n for k in active for n in ([8, k] if k else [8])]
    assert sizes == expected
    assert 0 < sum(active) < 32  # some samples borrowed, some did not


def test_stepper_takes_the_steps_train_takes(data, tiny_spec, tmp_path):
    cfg = _cfg(method="pogdiff", lam=1.0, a=0.0, psi_threshold=0.9)
    seen = []
    train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path / "train", on_step=lambda s, m: seen.append(m))
    step = stepper(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path / "stepper")
    assert [step() for _ in range(cfg.steps)] == seen  # the same metrics, loss and psi included, step by step
    assert not (tmp_path / "stepper").exists()  # nothing written


def test_resume_continues_from_the_last_checkpoint(data, tiny_spec, tmp_path):
    once = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(once, data, _cfg(steps=4, method="pogdiff"), tmp_path / "once")
    twice = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(twice, data, _cfg(steps=2, method="pogdiff"), tmp_path / "twice")
    fresh = PixelDiffusionPipeline.new(tiny_spec, seed=0)  # a new process would start from the base again
    result = train(fresh, data, _cfg(steps=4, method="pogdiff"), tmp_path / "twice")
    assert result.resumed_from == 2
    torch.testing.assert_close(_weights(fresh), _weights(once))


def test_time_limit_stops_with_a_checkpoint_and_a_rerun_finishes_the_same_training(data, tiny_spec, tmp_path):
    once = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(once, data, _cfg(steps=3, method="pogdiff"), tmp_path / "once")
    limited = _cfg(steps=3, method="pogdiff").model_copy(update={"time_limit_minutes": 1e-9})
    with pytest.raises(TrainingTimeLimit, match="reached at step 1/3; checkpoint step 1 kept"):
        train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, limited, tmp_path / "limited")
    # checkpoint_every=2, so step 1 was saved only because time ran out
    assert [p.name for p in (tmp_path / "limited" / "checkpoints").iterdir()] == ["step-00000001"]
    again = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    result = train(again, data, _cfg(steps=3, method="pogdiff"), tmp_path / "limited")
    assert result.resumed_from == 1
    torch.testing.assert_close(_weights(again), _weights(once))


def test_cbdm_runs_and_reports_its_terms(data, tiny_spec, tmp_path):
    pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    r = train(pipe, data, _cfg(steps=2, method="cbdm"), tmp_path / "cbdm")
    assert {"term/reg", "term/commit", "term/mse"} <= set(r.final)
    assert (r.model_dir / "pogdiff.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tiny_spec, tmp_path):
    pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(pipe, data, _cfg(steps=2, method="vanilla"), tmp_path / "run")
    good = (tmp_path / "run" / "checkpoints" / "step-00000002" / "unet.safetensors").read_bytes()
    bad = TrainData(data.images * float("nan"), data.captions, data.graph)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(PixelDiffusionPipeline.new(tiny_spec, seed=0), bad, _cfg(steps=4, method="vanilla"), tmp_path / "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000002"
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "unet.safetensors").read_bytes() == good


def _cfg_extra(steps, **kw):
    return TrainConfig(steps=steps, batch_size=8, learning_rate=1e-3, checkpoint_every=2, pog=PoGConfig(method="vanilla"), **kw)


def test_ema_decay_zero_saves_the_trained_weights(data, tiny_spec, tmp_path):
    init = _weights(PixelDiffusionPipeline.new(tiny_spec, seed=0))
    plain = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(plain, data, _cfg_extra(2), tmp_path / "plain")
    follow = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(follow, data, _cfg_extra(2, ema_decay=0.0), tmp_path / "zero")
    torch.testing.assert_close(_weights(follow), _weights(plain))
    assert not torch.equal(_weights(plain), init)


def test_ema_warm_up_forgets_the_starting_weights():
    # theta jumps from 0 to 1 and stays: the shadow's share of the start is prod_s d_s
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.999)
    torch.nn.init.ones_(net.weight)
    share = 1.0
    for step in range(1, 21):
        d = ema.decay_at(step)
        assert d == pytest.approx(min(0.999, (1 + step) / (10 + step)))
        share *= d
        ema.update(net, step)
    assert ema.shadow["weight"].item() == pytest.approx(1.0 - share, abs=1e-6)
    assert share < 1e-3  # a fixed decay of 0.999 would keep 0.999^20 = 98% of the start
    assert ema.decay_at(10**6) == 0.999


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=110, lr_warmup_steps=10, lr_schedule="cosine")
    factors = [lr_factor(s, cfg) for s in range(110)]
    assert factors[:9] == pytest.approx([(s + 1) / 10 for s in range(9)])
    assert factors[9] == 1.0 and factors[59] == pytest.approx(0.5) and factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    constant = TrainConfig(steps=110, lr_warmup_steps=10)
    assert [lr_factor(s, constant) for s in range(9, 110)] == [1.0] * 101


@pytest.mark.parametrize("extra", [{"ema_decay": 0.5}, {"lora_rank": 4}], ids=["ema", "lora"])
def test_resume_with_extra_state_matches_an_uninterrupted_run(data, tiny_spec, tmp_path, extra):
    once = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(once, data, _cfg_extra(4, **extra), tmp_path / "once")
    train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, _cfg_extra(2, **extra), tmp_path / "twice")
    again = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    assert train(again, data, _cfg_extra(4, **extra), tmp_path / "twice").resumed_from == 2
    torch.testing.assert_close(_weights(again), _weights(once))


def test_gradient_accumulation_runs_micro_batches_per_step(data, tiny_spec, tmp_path):
    pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    sizes, steps = [], []
    pipe.unet.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    r = train(pipe, data, _cfg_extra(3, gradient_accumulation_steps=2), tmp_path / "acc",
              on_step=lambda s, m: steps.append(s))
    assert steps == [1, 2, 3] and sizes == [8] * 6
    assert np.isfinite(r.final["loss"])


def test_accumulated_gradient_is_the_mean_over_micro_batches(data, tiny_spec, tmp_path):
    # The first micro-batch of an accumulated step draws the same data as a plain step, so its
    # contribution to the gradient must be exactly the plain gradient divided by the accumulation count.
    def first_step_grads(accum, out):
        pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
        seen = []
        pipe.unet.conv_in.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
        cfg = TrainConfig(steps=1, batch_size=4, gradient_accumulation_steps=accum, pog=PoGConfig(method="vanilla"))
        train(pipe, data, cfg, tmp_path / out)
        return seen

    plain = first_step_grads(1, "plain")
    accumulated = first_step_grads(3, "acc")
    assert len(plain) == 1 and len(accumulated) == 3
    torch.testing.assert_close(accumulated[0], plain[0] / 3)
    assert not torch.allclose(accumulated[1], accumulated[0])  # later micro-batches add their own gradient


def test_bf16_autocast_keeps_fp32_weights_and_trains(data, tiny_spec, tmp_path):
    pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    before = _weights(pipe).clone()
    r = train(pipe, data, _cfg_extra(2, mixed_precision="bf16"), tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    assert np.isfinite(r.final["loss"]) and not torch.equal(_weights(pipe), before)
    # the autocast run differs from the fp32 run (bf16 forwards), so autocast really was on
    fp32 = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    assert train(fp32, data, _cfg_extra(2), tmp_path / "fp32").final["loss"] != r.final["loss"]


def test_fp16_needs_cuda(data, tiny_spec, tmp_path):
    cfg = _cfg_extra(1, mixed_precision="fp16")
    if torch.cuda.is_available():  # loss-scaled fp16 trains and keeps fp32 weights
        pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
        assert np.isfinite(train(pipe, data, cfg, tmp_path / "x").final["loss"])
        assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    else:
        with pytest.raises(ValueError, match="fp16"):
            train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path / "x")


def test_prediction_type_override_is_saved_with_the_model(data, tiny_spec, tmp_path):
    pipe = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    r = train(pipe, data, _cfg_extra(1, prediction_type="epsilon"), tmp_path / "eps")
    assert PixelDiffusionPipeline.from_pretrained(str(r.model_dir)).scheduler.config.prediction_type == "epsilon"


def test_gradient_checkpointing_gives_the_same_training(data, tiny_spec, tmp_path):
    plain = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(plain, data, _cfg_extra(2), tmp_path / "plain")
    ckpt = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(ckpt, data, _cfg_extra(2, gradient_checkpointing=True), tmp_path / "ckpt")
    assert ckpt.unet.is_gradient_checkpointing
    torch.testing.assert_close(_weights(ckpt), _weights(plain))


def test_lora_trains_only_attention_projections(data, tiny_spec, tmp_path):
    base = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    r = train(base, data, _cfg_extra(3, lora_rank=4), tmp_path / "lora")
    assert (tmp_path / "lora" / "lora").is_dir()
    after = PixelDiffusionPipeline.from_pretrained(str(r.model_dir)).unet.state_dict()
    assert set(after) == set(before)  # plain UNet weights, no adapter keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed), sorted(changed)[:5]

