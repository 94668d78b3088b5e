"""This process's place in a DDP job (``accelerate launch`` / ``torchrun``), and the few collectives the trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def join_process_group() -> tuple[Distributed, bool]:
    """Join the DDP job when launched with WORLD_SIZE > 1; returns (place, whether this call created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))), created
