"""Training checkpoints: written atomically with a sha256 manifest, resumed from the newest that verifies.

A checkpoint is a folder ``step-<8 digits>`` holding ``unet.safetensors`` (the trainable model's
state), ``ema.safetensors`` (when an EMA is kept), ``state.pt`` (optimizer, learning-rate schedule,
the trainer's random generators) and ``manifest.json`` ({"step", "files": {name: sha256}}). The two
newest are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pogdiff.atomic import TMP_SUFFIX, write_folder_atomic
from pogdiff.optim import EMA

log = logging.getLogger(__name__)

CHECKPOINT_MANIFEST = "manifest.json"


def checkpoint_dirs(root: Path) -> list[Path]:
    """The ``step-*`` folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_step(path: Path) -> int | None:
    """The step of checkpoint folder ``path`` when every file its manifest lists is there with its
    sha256, else None (truncated or corrupted by a crash or a power loss, or no manifest)."""
    try:
        manifest = json.loads((path / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
        if all(_digest(path / name) == digest for name, digest in manifest["files"].items()):
            return int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def clean_checkpoints(root: Path) -> None:
    """Remove what a crash mid-save leaves: ``.<name>.<random>.tmp`` folders and ``.<name>.old`` folders."""
    if root.is_dir():
        for stale in root.iterdir():
            if stale.is_dir() and stale.name.startswith(".") and stale.name.endswith((TMP_SUFFIX, ".old")):
                shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(root: Path, step: int, unet, optimizer, lr_sched, generators: list[torch.Generator], ema: EMA | None, keep: int = 2) -> None:
    """Write ``root/step-<step>`` atomically, then drop all but the ``keep`` newest checkpoints."""

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
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, unet, optimizer, lr_sched, generators: list[torch.Generator], ema: EMA | None) -> None:
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


def resume_latest(root: Path, unet, optimizer, lr_sched, generators: list[torch.Generator], ema: EMA | None) -> int:
    """Load the newest checkpoint under ``root`` that verifies into the given objects; its step, 0 when none does."""
    for path in reversed(checkpoint_dirs(root)):
        if (step := verified_step(path)) is not None:
            _load_checkpoint(path, unet, optimizer, lr_sched, generators, ema)
            return step
        log.warning("checkpoint %s does not match its manifest (truncated or corrupt); trying an older one", path)
    return 0
