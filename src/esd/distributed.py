"""Data-parallel erasing across processes (torchrun / `accelerate launch`), gradients averaged.

Each process draws its own examples (concept w, DDIM step k, noise z_T) from its own seeds and computes
its own gradient; the gradients of θ are averaged with one all-reduce per step, so every process takes
the same Adam step and θ stays identical everywhere. With W processes of batch B this is one process
with batch W·B (tested with two gloo processes on CPU). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> Dist:
    """Join the process group the launcher describes (RANK/WORLD_SIZE/...); a lone process gets Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(params, world: int) -> None:
    """Sum every θ gradient across processes, then divide by the number of processes."""
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def global_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over all processes (itself for one process)."""
    if world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world


def example_seeds(seed: int, rank: int, batch_size: int) -> list[int]:
    """Seeds of this process's example slots: global slot g = rank·B + b gets seed + g.

    One process with batch W·B therefore draws exactly the examples of W processes with batch B.
    """
    return [seed + rank * batch_size + b for b in range(batch_size)]


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def device_for(d: Dist, requested: torch.device) -> torch.device:
    """Under a launcher each process takes its own GPU (LOCAL_RANK); CPU stays CPU."""
    if d.world > 1 and requested.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return requested
