"""The fine-tuning loop: one trainer for vanilla, CBDM and PoGDiff, so comparisons are fair.

It never talks to a tracking server: progress goes to the ``on_step(step, metrics)`` callback.
Checkpoints are written atomically every ``checkpoint_every`` steps and the run resumes from the
latest one, so an interrupted fine-tune continues where it stopped.

It trains any ``TextToImagePipeline`` (pixel space, or Stable Diffusion through its VAE) and runs
unchanged under ``accelerate launch`` / ``torchrun`` (DDP): every rank draws the same global batch
from the same seeded streams and trains on its contiguous shard, so a W-process run follows the
single-process trajectory up to the order of floating-point sums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from pogdiff.atomic import TMP_SUFFIX, write_folder_atomic
from pogdiff.config import TrainConfig
from pogdiff.neighbours import NeighbourGraph, draw_borrowing, similarity_threshold
from pogdiff.objectives import cbdm_loss, min_snr_weight, pogdiff_loss, vanilla_loss
from pogdiff.pipelines.base import TextToImagePipeline, latent_features
from pogdiff.process import WriterLock

StepCallback = Callable[[int, dict[str, float]], None]
log = logging.getLogger(__name__)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as in the diffusers LoRA example


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class TrainingTimeLimit(RuntimeError):
    """``train.time_limit_minutes`` ran out; a checkpoint of the last finished step was written."""


@dataclass(frozen=True)
class TrainData:
    """In-memory training set. images ``[N, 3, H, W]`` in [-1, 1]; captions ``C`` strings; graph indexes them."""

    images: torch.Tensor
    captions: list[str]
    graph: NeighbourGraph

    def __post_init__(self):
        n = self.images.shape[0]
        if n == 0:
            raise ValueError("training set is empty")
        if self.graph.caption_of.shape != (n,):
            raise ValueError(f"caption_of has shape {tuple(self.graph.caption_of.shape)}, expected ({n},)")
        if self.graph.num_captions != len(self.captions):
            raise ValueError(f"graph has {self.graph.num_captions} captions, data has {len(self.captions)}")


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    steps: int
    resumed_from: int
    seconds: float
    final: dict[str, float]


def _quartile_means(values: torch.Tensor, t: torch.Tensor, num_train_timesteps: int, name: str) -> dict[str, float]:
    """Mean of ``values`` ``[B]`` per timestep quartile, keys ``{name}/q1..q4`` (only non-empty ones)."""
    q = (t * 4 // num_train_timesteps).clamp(0, 3)
    out = {}
    for i in range(4):
        sel = q == i
        if sel.any():
            out[f"{name}/q{i + 1}"] = values[sel].float().mean().item()
    return out


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warm-up over ``lr_warmup_steps``,
    then 1 (``constant``) or 0.5 (1 + cos(pi p)) with p the share of the remaining steps done (``cosine``)."""
    warm = max(cfg.lr_warmup_steps, 1)
    if step + 1 < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    p = min(1.0, (step + 1 - warm) / max(cfg.steps - warm, 1))
    return 0.5 * (1.0 + math.cos(math.pi * p))


class EMA:
    """Exponential moving average of the trainable weights: shadow <- d_s * shadow + (1 - d_s) * theta,
    d_s = min(decay, (1 + s) / (10 + s)) after optimizer step s (counted from 1).

    The warm-up of d_s (as diffusers' ``EMAModel``) keeps the random or pretrained starting weights
    from lingering: with a fixed d = 0.999 they would still make up 0.999^1500 = 22% of the average
    after 1500 steps (measured on the embedded base: detector accuracy 0.19 with, 0.52 without them).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for k, p in model.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k].to(p.dtype))


CHECKPOINT_MANIFEST = "manifest.json"


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified_step(path: Path) -> int | None:
    """The step of checkpoint folder ``path`` when every file its manifest lists is there with its
    sha256, else None (truncated or corrupted by a crash or a power loss, or no manifest)."""
    try:
        manifest = json.loads((path / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
        if all(_digest(path / name) == digest for name, digest in manifest["files"].items()):
            return int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _clean_checkpoints(root: Path) -> None:
    """Remove what a crash mid-save leaves: ``.<name>.<random>.tmp`` folders and ``.<name>.old`` folders."""
    if root.is_dir():
        for stale in root.iterdir():
            if stale.is_dir() and stale.name.startswith(".") and stale.name.endswith((TMP_SUFFIX, ".old")):
                shutil.rmtree(stale, ignore_errors=True)


def _save_checkpoint(root: Path, step: int, unet, optimizer, lr_sched, generators: list[torch.Generator], ema: EMA | None, keep: int = 2) -> None:
    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
        if ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "lr_sched": lr_sched.state_dict(), "rng": [g.get_state() for g in generators]},
            tmp / "state.pt",
        )
        files = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))

    # a folder of the same step left by an earlier run into this folder that was not resumed is superseded
    write_folder_atomic(root / f"step-{step:08d}", write)
    for old in _checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, step: int, unet, optimizer, lr_sched, generators: list[torch.Generator], ema: EMA | None) -> int:
    unet.load_state_dict(load_file(path / "unet.safetensors"))
    if ema is not None:
        if not (path / "ema.safetensors").exists():
            raise ValueError(f"checkpoint {path} has no EMA weights but ema_decay is set; resume with the same config")
        ema.shadow = load_file(path / "ema.safetensors", device=str(next(unet.parameters()).device))
    # weights_only: our own checkpoint, but never unpickle arbitrary objects.
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_sched"])
    for g, st in zip(generators, state["rng"], strict=True):
        g.set_state(st)
    return step


@dataclass(frozen=True)
class Distributed:
    """This process's place in a DDP job, from the variables ``accelerate launch`` / ``torchrun`` set."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's contiguous share of a global batch (the batch must divide evenly)."""
        if batch_size % self.world:
            raise ValueError(f"train.batch_size {batch_size} is not divisible by the {self.world} processes")
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, rows: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample ``[b]`` vectors of every rank -> global ``[W * b]`` vectors on the CPU, in rank order (one collective)."""
        if self.world == 1:
            return rows
        names = list(rows)
        local = torch.stack([rows[k].detach().to(device, torch.float32) for k in names])  # [K, b]
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        full = torch.cat(parts, dim=1).cpu()
        return {k: full[i] for i, k in enumerate(names)}

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on some rank (one collective), so all ranks stop together."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _join_process_group() -> tuple[Distributed, bool]:
    """Join the DDP job when launched with WORLD_SIZE > 1; returns (place, whether this call created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))), created


def train(
    pipe: TextToImagePipeline,
    data: TrainData,
    cfg: TrainConfig,
    out_dir: Path,
    on_step: StepCallback | None = None,
    resume: bool = True,
) -> TrainResult:
    """Fine-tune ``pipe.unet`` on ``data`` with ``cfg.pog.method``; write ``out_dir/model``.

    Per step: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, one forward for y, and for PoGDiff a
    no-grad forward for the neighbour caption y' on the samples whose psi exceeds the threshold.
    z0 comes from ``pipe.encode_images`` once, before the first step (the pixels themselves, or
    the scaled VAE posterior of each image, sampled afresh every step as the diffusers example does).

    Under DDP (WORLD_SIZE > 1) ``cfg.batch_size`` is the global batch; only rank 0 calls
    ``on_step`` and writes checkpoints and the model. Rank 0 holds ``out_dir``'s writer lock while it
    trains: a second trainer into the same folder raises ``RunFolderBusy`` before writing anything.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    ddp, created_group = _join_process_group()
    try:
        # rank 0 writes the folder: it alone holds the writer lock, for the whole training
        with WriterLock(out_dir) if ddp.main else nullcontext():
            return _train(pipe, data, cfg, out_dir, ckpt_root, on_step, resume, ddp, started)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(
    pipe: TextToImagePipeline,
    data: TrainData,
    cfg: TrainConfig,
    out_dir: Path,
    ckpt_root: Path,
    on_step: StepCallback | None,
    resume: bool,
    ddp: Distributed,
    started: float,
) -> TrainResult:
    shard = ddp.shard(cfg.batch_size)
    if torch.cuda.is_available():
        device = torch.device("cuda", ddp.local_rank) if ddp.world > 1 else torch.device("cuda")
    else:
        device = torch.device("cpu")
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
    sched = pipe.scheduler
    if cfg.prediction_type is not None:
        # As the diffusers examples' --prediction_type: train the model towards another target.
        sched.register_to_config(prediction_type=cfg.prediction_type)
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    T = sched.config.num_train_timesteps
    prediction_type = sched.config.prediction_type
    pog = cfg.pog

    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    # Data order, noise and timesteps come from `gen` alone, so every method sees the same batches;
    # neighbour draws use their own stream and never shift the data stream.
    gen = torch.Generator().manual_seed(cfg.seed)
    gen_nb = torch.Generator().manual_seed(cfg.seed + 1)
    generators = [gen, gen_nb]

    ema = EMA(unet, cfg.ema_decay) if cfg.ema_decay is not None else None
    start = 0
    if ddp.main:
        _clean_checkpoints(ckpt_root)
    if resume:
        for path in reversed(_checkpoint_dirs(ckpt_root)):
            if (step := _verified_step(path)) is not None:
                start = _load_checkpoint(path, step, unet, optimizer, lr_sched, generators, ema)
                break
            log.warning("checkpoint %s does not match its manifest (truncated or corrupt); trying an older one", path)
    # The gradient forward goes through DDP (gradients all-reduced in backward); the PoGDiff
    # neighbour forward needs no gradient and calls the bare UNet.
    model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) if ddp.world > 1 else unet

    hidden, mask = pipe.encode_captions(data.captions + [""])
    hidden = hidden.to(device)
    mask = mask.to(device) if mask is not None else None
    z_mean, z_std = pipe.encode_images(data.images)
    null = len(data.captions)
    graph = data.graph
    if pog.similarity_features == "latent":
        graph = replace(graph, image_features=latent_features(z_mean))
    tau = similarity_threshold(graph.image_features, graph.caption_of, pog.similarity_quantile) if pog.method == "pogdiff" else 0.0
    alphas = sched.alphas_cumprod.to(device)
    n_images, n_captions = data.images.shape[0], len(data.captions)
    metrics: dict[str, float] = {}

    def forward(net, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return net(x, t, hidden[c], encoder_attention_mask=mask[c] if mask is not None else None).sample

    def micro_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """One forward of this rank's shard of ``cfg.batch_size`` samples: per-sample weighted loss, terms, psi stats, t.

        Every random draw is made for the whole global batch, so all ranks keep identical streams.
        """
        B = cfg.batch_size
        idx = torch.randint(n_images, (B,), generator=gen)
        cap = graph.caption_of[idx]
        drop = torch.rand(B, generator=gen) < cfg.caption_dropout
        cond = torch.where(drop, torch.full_like(cap, null), cap)
        x0 = z_mean[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(T, (B,), generator=gen)
        if z_std is not None:  # a fresh draw from the VAE posterior
            x0 = x0 + z_std[idx] * torch.randn(x0.shape, generator=gen)

        if pog.method == "pogdiff":
            borrow = draw_borrowing(graph, idx, t, drop, pog, tau, T, gen_nb)
            nb_cap, psi, active = borrow.nb_caption, borrow.psi, borrow.active
        elif pog.method == "cbdm":
            # y' uniform over the other captions (the fine-tuning setting of the official code).
            other = torch.randint(max(n_captions - 1, 1), (B,), generator=gen_nb)
            y2 = torch.where(other >= cap, other + 1, other) if n_captions > 1 else cap
            weight = (pog.cbdm_tau * t.float() / T) * (~drop).float()

        x0, noise, t, cond = x0[shard].to(device), noise[shard].to(device), t[shard], cond[shard]
        t_dev = t.to(device)
        xt = sched.add_noise(x0, noise, t_dev)
        target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t_dev)

        pred = forward(model, xt, t_dev, cond.to(device))
        extra: dict[str, torch.Tensor] = {}
        if pog.method == "vanilla":
            terms = vanilla_loss(pred, target)
        elif pog.method == "pogdiff":
            psi, active, nb_cap = psi[shard], active[shard], nb_cap[shard]
            # Sparse neighbour branch: the extra forward runs only where the target actually moves.
            nb = pred.detach().clone()
            if active.any():
                a_dev = active.to(device)
                with torch.no_grad():
                    nb[a_dev] = forward(unet, xt[a_dev], t_dev[a_dev], nb_cap[active].to(device))
            terms = pogdiff_loss(pred, target, nb, psi.to(device), pog.loss_form)
            extra = {"psi": psi, "active": active.float()}
        elif pog.method == "cbdm":
            nb = forward(model, xt, t_dev, y2[shard].to(device))
            terms = cbdm_loss(pred, target, nb, weight[shard].to(device))
        else:
            raise ValueError(f"unknown method {pog.method!r}")

        loss_vec = terms["loss"]
        if cfg.snr_gamma is not None:
            ab = alphas[t_dev]
            loss_vec = loss_vec * min_snr_weight(ab / (1 - ab), cfg.snr_gamma, prediction_type)
        return loss_vec, terms, extra, t

    accum = cfg.gradient_accumulation_steps
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    # Weights and optimizer state stay fp32; fp16 gradients are loss-scaled (a no-op otherwise).
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    limit = None if cfg.time_limit_minutes is None else cfg.time_limit_minutes * 60
    for step in range(start, cfg.steps):
        parts = []
        for micro in range(accum):
            # DDP all-reduces in the backward of the last micro-batch only; before it gradients accumulate locally.
            sync = nullcontext() if ddp.world == 1 or micro == accum - 1 else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss_vec, terms, extra, t = micro_batch()
                # Every rank sees the global per-sample values, so all stop together on a bad loss.
                seen = ddp.gather({"loss_vec": loss_vec, "t": t, **{f"term/{k}": v for k, v in terms.items()}, **extra}, device)
                loss = seen["loss_vec"].mean()
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {step + 1}; stopped, last good checkpoint kept in {ckpt_root}"
                    )
                # Scaled so the accumulated gradient is that of the mean over all micro-batches (and ranks: DDP averages).
                scaler.scale(loss_vec.mean() / accum).backward()
            parts.append((
                seen["loss_vec"].detach().cpu(),
                {k: seen[f"term/{k}"].detach().float().mean().item() for k in terms},
                {k: seen[k] for k in extra},
                seen["t"].long().cpu(),
            ))
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unet, step + 1)

        losses = torch.cat([p[0] for p in parts])
        ts = torch.cat([p[3] for p in parts])
        metrics = {"loss": losses.mean().item(), "grad_norm": float(grad_norm), "lr": lr_sched.get_last_lr()[0]}
        for name in parts[0][1]:
            if name != "loss":
                metrics[f"term/{name}"] = sum(p[1][name] for p in parts) / accum
        metrics.update(_quartile_means(losses, ts, T, "loss"))
        if parts[0][2]:
            psi = torch.cat([p[2]["psi"] for p in parts])
            metrics["psi/mean"] = psi.mean().item()
            metrics["psi/active_share"] = torch.cat([p[2]["active"] for p in parts]).mean().item()
            metrics.update(_quartile_means(psi, ts, T, "psi"))
            metrics["psi/tau"] = tau
        if ddp.main:
            if on_step is not None:
                on_step(step + 1, metrics)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                _save_checkpoint(ckpt_root, step + 1, unet, optimizer, lr_sched, generators, ema)
        # Enforced here, between steps, because an orchestrator's timeout cannot interrupt a
        # training loop running in a worker thread; every rank stops at the same step.
        out_of_time = limit is not None and time.perf_counter() - started > limit
        if step + 1 < cfg.steps and ddp.any(out_of_time, device):
            if ddp.main and (step + 1) % cfg.checkpoint_every:
                _save_checkpoint(ckpt_root, step + 1, unet, optimizer, lr_sched, generators, ema)
            raise TrainingTimeLimit(
                f"train.time_limit_minutes={cfg.time_limit_minutes} reached at step {step + 1}/{cfg.steps}; "
                f"checkpoint step {step + 1} kept in {ckpt_root}, a re-run resumes from it"
            )

    if ema is not None:
        ema.copy_to(unet)  # as the diffusers examples do: the saved model carries the EMA weights
    if cfg.lora_rank is not None:
        if ddp.main:
            unet.save_lora_adapter(out_dir / "lora")  # the adapter alone, a few hundred KB
        unet.fuse_lora()  # the model folder holds plain UNet weights, loadable without peft
        unet.unload_lora()
    unet.eval()
    model_dir = out_dir / "model"
    if ddp.main:
        pipe.save_pretrained(model_dir, extra={"method": pog.method, "steps": cfg.steps})
    if ddp.world > 1:
        dist.barrier()  # every rank returns only once the model folder exists
    return TrainResult(model_dir, cfg.steps, start, time.perf_counter() - started, metrics)
