"""The fine-tuning loop: one trainer for vanilla, CBDM and PoGDiff, so comparisons are fair.

Each step draws the batch every method shares, lets the method (``pogdiff.methods``, by
``train.pog.method``) draw what it needs on top and compute its loss, then takes one optimizer step.

It never talks to a tracking server: progress goes to the ``on_step(step, metrics)`` callback.
Checkpoints are written atomically every ``checkpoint_every`` steps and the run resumes from the
latest one, so an interrupted fine-tune continues where it stopped.

It trains any ``TextToImagePipeline`` (pixel space, or Stable Diffusion through its VAE) and runs
unchanged under ``accelerate launch`` / ``torchrun`` (DDP): every rank draws the same global batch
from the same seeded streams and trains on its contiguous shard, so a W-process run follows the
single-process trajectory up to the order of floating-point sums.
"""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel

from pogdiff.allocator import keep_freed_memory
from pogdiff.checkpoints import clean_checkpoints, resume_latest, save_checkpoint
from pogdiff.config import TrainConfig
from pogdiff.distributed import Distributed, join_process_group
from pogdiff.methods import Batch, Method, Shard, Tensors, make_method, quartile_means
from pogdiff.neighbours import normalised_feature
from pogdiff.objectives import min_snr_weight
from pogdiff.optim import EMA, lr_factor
from pogdiff.phases import NO_PHASES, Phases
from pogdiff.pipelines.base import ADAPTER_DIR, TextToImagePipeline
from pogdiff.process import WriterLock
from pogdiff.sampling import Exposure
from pogdiff.train_data import TrainData

StepCallback = Callable[[int, dict[str, float]], None]
CHECKPOINTS_DIR = "checkpoints"  # in a run folder: one step-NNNNNNNN folder per checkpoint
MODEL_DIR = "model"  # in a run folder: the trained model (a LoRA adapter fused in)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as in the diffusers LoRA example


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class TrainingTimeLimit(RuntimeError):
    """``train.time_limit_minutes`` ran out; a checkpoint of the last finished step was written."""


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    steps: int
    resumed_from: int
    seconds: float
    final: dict[str, float]


def train(
    pipe: TextToImagePipeline,
    data: TrainData,
    cfg: TrainConfig,
    out_dir: Path,
    on_step: StepCallback | None = None,
    resume: bool = True,
    phases: Phases = NO_PHASES,
) -> TrainResult:
    """Fine-tune ``pipe.unet`` on ``data`` with ``cfg.pog.method``; write ``out_dir/model``.

    Per step: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, one forward for y, and the method's own
    (for PoGDiff a no-grad forward for the neighbour caption y' on the samples whose psi exceeds the
    threshold; for CBDM a forward for y' with gradient).
    z0 comes from ``pipe.encode_images`` once, before the first step (the pixels themselves, or
    the scaled VAE posterior of each image, sampled afresh every step as the diffusers example does).

    Under DDP (WORLD_SIZE > 1) ``cfg.batch_size`` is the global batch; only rank 0 calls
    ``on_step`` and writes checkpoints and the model. Rank 0 holds ``out_dir``'s writer lock while it
    trains: a second trainer into the same folder raises ``RunFolderBusy`` before writing anything.
    ``phases`` (a ``pogdiff.phases.PhaseTimer``) sums the seconds of each phase of the steps.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINTS_DIR
    ddp, created_group = join_process_group()
    try:
        # rank 0 writes the folder: it alone holds the writer lock, for the whole training
        with WriterLock(out_dir) if ddp.main else nullcontext():
            run = _setup(pipe, data, cfg, ckpt_root, resume, ddp, phases)
            return _train(run, pipe, out_dir, on_step, started)
    finally:
        if created_group:
            dist.destroy_process_group()


def stepper(pipe: TextToImagePipeline, data: TrainData, cfg: TrainConfig, out_dir: Path, phases: Phases = NO_PHASES) -> Callable[[], dict[str, float]]:
    """``step()``: the next optimizer step of a one-process training and its metrics (as ``on_step`` gets them), for
    a bench that interleaves trainings step by step; no lock, checkpoint or model is written, nothing resumes."""
    run = _setup(pipe, data, cfg, Path(out_dir) / CHECKPOINTS_DIR, False, Distributed(), phases)
    steps = itertools.count()
    return lambda: _step_metrics(run, *_step(run, next(steps)))


@dataclass(frozen=True)
class _Run:
    """What ``_setup`` prepares once and every step uses."""

    cfg: TrainConfig
    ddp: Distributed
    shard: slice  # this rank's rows of a global batch
    device: torch.device
    unet: torch.nn.Module  # the bare UNet: checkpoints, EMA, no-grad forwards
    model: torch.nn.Module  # the gradient forwards go through it: the UNet, or its DDP wrapper
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: EMA | None
    # [data stream, neighbour stream]: images, dropout, noise and timesteps come from the first alone, so
    # every method sees the same batches; a method's own draws never shift it. Saved with each checkpoint.
    generators: list[torch.Generator]
    scheduler: DDPMScheduler
    alphas: torch.Tensor  # [T] abar_t, on the device
    hidden: torch.Tensor  # [C + 1, L, D] conditioning of every caption, the empty caption last; on the device
    mask: torch.Tensor | None  # [C + 1, L]
    z_mean: torch.Tensor  # [N, C', h, w] z0 of every training image (its posterior mean for a VAE)
    z_std: torch.Tensor | None  # [N, C', h, w] the posterior std; None: z0 is deterministic
    caption_of: torch.Tensor  # [N]
    exposure: Exposure | None  # the draw's weights over images; None: uniform (plain randint)
    method: Method
    ckpt_root: Path
    start: int  # optimizer steps already done (resumed from a checkpoint)
    phases: Phases  # times the phases of each step (``pogdiff.phases``); NO_PHASES times nothing

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def predict(self, x: torch.Tensor, t: torch.Tensor, captions: torch.Tensor, grad: bool) -> torch.Tensor:
        """f(x, captions, t) ``[b, C', h, w]``: with ``grad`` through ``model``, else the bare UNet in inference mode
        (no graph, and no version counters or view tracking either: about 3 % off a small model's forward on the CPU)."""
        with nullcontext() if grad else torch.inference_mode():
            c = captions.to(self.device)
            mask = self.mask[c] if self.mask is not None else None
            return (self.model if grad else self.unet)(x, t, self.hidden[c], encoder_attention_mask=mask).sample


def _device(ddp: Distributed) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", ddp.local_rank) if ddp.world > 1 else torch.device("cuda")
    return torch.device("cpu")


def _trainable_unet(pipe: TextToImagePipeline, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """``pipe.unet`` on ``device`` in training mode: trained whole, or through a LoRA adapter kept in fp32."""
    unet = pipe.to(device).unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.lora_rank is not None:
        unet.requires_grad_(False)
        # Seeded init: every DDP rank and every re-run starts from the same adapter, whatever the global RNG did before.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA weights stay fp32 whatever the base dtype
    return unet


def _setup(
    pipe: TextToImagePipeline, data: TrainData, cfg: TrainConfig, ckpt_root: Path, resume: bool, ddp: Distributed, phases: Phases
) -> _Run:
    """Model, optimizer, random streams and method, resumed from the newest verified checkpoint when
    ``resume``; the captions and images encoded once (z0 and, for a VAE, its posterior std)."""
    shard = ddp.shard(cfg.batch_size)
    device = _device(ddp)
    if device.type == "cpu":
        keep_freed_memory()  # the activations freed each step stay in the heap, not faulted in again
    unet = _trainable_unet(pipe, cfg, device)
    sched = pipe.scheduler
    if cfg.prediction_type is not None:
        # As the diffusers examples' --prediction_type: train the model towards another target.
        sched.register_to_config(prediction_type=cfg.prediction_type)
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    generators = [torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)]
    ema = EMA(unet, cfg.ema_decay) if cfg.ema_decay is not None else None
    if ddp.main:
        clean_checkpoints(ckpt_root)
    start = resume_latest(ckpt_root, unet, optimizer, lr_sched, generators, ema) if resume else 0
    # The gradient forwards go through DDP (gradients all-reduced in backward); the PoGDiff
    # neighbour forward needs no gradient and calls the bare UNet.
    model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) if ddp.world > 1 else unet

    hidden, mask = pipe.encode_captions(data.captions + [""])
    z_mean, z_std = pipe.encode_images(data.images)
    graph = data.graph
    if cfg.pog.similarity_features == "latent":
        graph = replace(graph, image_features=normalised_feature(z_mean))
    return _Run(
        cfg=cfg, ddp=ddp, shard=shard, device=device, unet=unet, model=model, trainable=trainable,
        optimizer=optimizer, lr_sched=lr_sched,
        # Weights and optimizer state stay fp32; fp16 gradients are loss-scaled (a no-op otherwise).
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16"),
        ema=ema, generators=generators, scheduler=sched, alphas=sched.alphas_cumprod.to(device),
        hidden=hidden.to(device), mask=mask.to(device) if mask is not None else None,
        z_mean=z_mean, z_std=z_std, caption_of=graph.caption_of,
        exposure=None if cfg.sampling == "uniform" else data.exposure(cfg),
        method=make_method(cfg.pog, graph, sched.config.num_train_timesteps, phases), ckpt_root=ckpt_root, start=start,
        phases=phases,
    )


def _draw(run: _Run) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data stream's draws for one global batch of B: (batch, z0 ``[B, C', h, w]``, eps ``[B, C', h, w]``,
    conditioning caption ids ``[B]``, the empty caption where dropped).

    Every random draw is made for the whole global batch, so all ranks keep identical streams. Rows are
    uniform (``randint``, the stream plain fine-tuning always drew) or drawn from ``train.sampling``'s
    exposure; the later draws of the step follow from the same generator either way.
    """
    cfg, gen = run.cfg, run.generators[0]
    B, null = cfg.batch_size, run.hidden.shape[0] - 1
    idx = torch.randint(run.caption_of.shape[0], (B,), generator=gen) if run.exposure is None else run.exposure.draw(B, gen)
    cap = run.caption_of[idx]
    drop = torch.rand(B, generator=gen) < cfg.caption_dropout
    cond = torch.where(drop, torch.full_like(cap, null), cap)
    x0 = run.z_mean[idx]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(run.num_train_timesteps, (B,), generator=gen)
    if run.z_std is not None:  # a fresh draw from the VAE posterior
        x0 = x0 + run.z_std[idx] * torch.randn(x0.shape, generator=gen)
    return Batch(idx, cap, drop, t), x0, noise, cond


def _micro_batch(run: _Run) -> tuple[torch.Tensor, Tensors, Tensors, torch.Tensor]:
    """One forward of this rank's shard of a global batch: weighted loss ``[b]``, the method's terms and report, t ``[b]``.

    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps; with ``snr_gamma`` the loss is weighted by
    ``min_snr_weight`` of SNR_t = abar_t / (1 - abar_t).
    """
    s, device, sched, phase = run.shard, run.device, run.scheduler, run.phases
    prediction_type = sched.config.prediction_type
    with phase("data"):
        batch, x0, noise, cond = _draw(run)
        x0, noise, t, cond = x0[s].to(device), noise[s].to(device), batch.t[s], cond[s]
        t_dev = t.to(device)
        xt = sched.add_noise(x0, noise, t_dev)
        target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t_dev)
    draws = run.method.draw(batch, run.generators[1])
    with phase("forward"):
        pred = run.predict(xt, t_dev, cond, grad=True)
    with phase("loss"):
        terms, report = run.method.loss(Shard(xt, t_dev, pred, target, run.predict), {k: v[s] for k, v in draws.items()})
        loss_vec = terms["loss"]
        if run.cfg.snr_gamma is not None:
            ab = run.alphas[t_dev]
            loss_vec = loss_vec * min_snr_weight(ab / (1 - ab), run.cfg.snr_gamma, prediction_type)
    return loss_vec, terms, report, t


@dataclass(frozen=True)
class _Part:
    """One micro-batch's values over the global batch, on the CPU: loss ``[B]``, term means, report ``{name: [B]}``, t ``[B]``."""

    loss: torch.Tensor
    terms: dict[str, float]
    report: Tensors
    t: torch.Tensor


def _step(run: _Run, step: int) -> tuple[list[_Part], float]:
    """Optimizer step ``step + 1`` over ``gradient_accumulation_steps`` micro-batches: their parts and the gradient norm."""
    cfg, ddp, device = run.cfg, run.ddp, run.device
    accum = cfg.gradient_accumulation_steps
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    parts = []
    for micro in range(accum):
        # DDP all-reduces in the backward of the last micro-batch only; before it gradients accumulate locally.
        sync = nullcontext() if ddp.world == 1 or micro == accum - 1 else run.model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss_vec, terms, report, t = _micro_batch(run)
            # Every rank sees the global per-sample values, so all stop together on a bad loss.
            seen = ddp.gather({"loss_vec": loss_vec, "t": t, **{f"term/{k}": v for k, v in terms.items()}, **report}, device)
            loss = seen["loss_vec"].mean()
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {step + 1}; stopped, last good checkpoint kept in {run.ckpt_root}"
                )
            # Scaled so the accumulated gradient is that of the mean over all micro-batches (and ranks: DDP averages).
            with run.phases("backward"):
                run.scaler.scale(loss_vec.mean() / accum).backward()
        parts.append(_Part(
            seen["loss_vec"].detach().cpu(),
            {k: seen[f"term/{k}"].detach().float().mean().item() for k in terms},
            {k: seen[k] for k in report},
            seen["t"].long().cpu(),
        ))
    with run.phases("optimizer"):
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.lr_sched.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.unet, step + 1)
    return parts, float(grad_norm)


def _step_metrics(run: _Run, parts: list[_Part], grad_norm: float) -> dict[str, float]:
    """Loss, gradient norm, learning rate, each loss term, loss by timestep quartile, and the method's own."""
    losses = torch.cat([p.loss for p in parts])
    ts = torch.cat([p.t for p in parts])
    metrics = {"loss": losses.mean().item(), "grad_norm": grad_norm, "lr": run.lr_sched.get_last_lr()[0]}
    for name in parts[0].terms:
        if name != "loss":
            metrics[f"term/{name}"] = sum(p.terms[name] for p in parts) / len(parts)
    metrics.update(quartile_means(losses, ts, run.num_train_timesteps, "loss"))
    report = {k: torch.cat([p.report[k] for p in parts]) for k in parts[0].report}
    metrics.update(run.method.metrics(report, ts))
    return metrics


def _checkpoint(run: _Run, step: int, started: float) -> None:
    """After optimizer step ``step`` (from 1): rank 0 checkpoints every ``checkpoint_every`` steps and at
    the last; when the time limit has run out, every rank stops (``TrainingTimeLimit``) after a checkpoint."""
    cfg, ddp = run.cfg, run.ddp
    state = (run.unet, run.optimizer, run.lr_sched, run.generators, run.ema)
    if ddp.main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
        save_checkpoint(run.ckpt_root, step, *state)
    # Enforced here, between steps, because an orchestrator's timeout cannot interrupt a
    # training loop running in a worker thread; every rank stops at the same step.
    limit = None if cfg.time_limit_minutes is None else cfg.time_limit_minutes * 60
    out_of_time = limit is not None and time.perf_counter() - started > limit
    if step < cfg.steps and ddp.any(out_of_time, run.device):
        if ddp.main and step % cfg.checkpoint_every:
            save_checkpoint(run.ckpt_root, step, *state)
        raise TrainingTimeLimit(
            f"train.time_limit_minutes={cfg.time_limit_minutes} reached at step {step}/{cfg.steps}; "
            f"checkpoint step {step} kept in {run.ckpt_root}, a re-run resumes from it"
        )


def _save_model(run: _Run, pipe: TextToImagePipeline, out_dir: Path) -> Path:
    """The trained weights into ``pipe`` (EMA copied in, a LoRA adapter fused); rank 0 writes ``out_dir/model``."""
    if run.ema is not None:
        run.ema.copy_to(run.unet)  # as the diffusers examples do: the saved model carries the EMA weights
    if run.cfg.lora_rank is not None:
        if run.ddp.main:
            run.unet.save_lora_adapter(out_dir / ADAPTER_DIR)  # the adapter alone, a few hundred KB
        run.unet.fuse_lora()  # the model folder holds plain UNet weights, loadable without peft
        run.unet.unload_lora()
    run.unet.eval()
    model_dir = out_dir / MODEL_DIR
    if run.ddp.main:
        pipe.save_pretrained(model_dir, extra={"method": run.cfg.pog.method, "steps": run.cfg.steps})
    if run.ddp.world > 1:
        dist.barrier()  # every rank returns only once the model folder exists
    return model_dir


def _train(run: _Run, pipe: TextToImagePipeline, out_dir: Path, on_step: StepCallback | None, started: float) -> TrainResult:
    """The steps from ``run.start`` to ``train.steps``, then the model written."""
    metrics: dict[str, float] = {}
    for step in range(run.start, run.cfg.steps):
        parts, grad_norm = _step(run, step)
        metrics = _step_metrics(run, parts, grad_norm)
        if run.ddp.main and on_step is not None:
            on_step(step + 1, metrics)
        _checkpoint(run, step + 1, started)
    model_dir = _save_model(run, pipe, out_dir)
    return TrainResult(model_dir, run.cfg.steps, run.start, time.perf_counter() - started, metrics)
