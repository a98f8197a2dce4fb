"""What `fit` needs to know when it is one of several data-parallel workers.

The process group, the DistributedDataParallel wrap and the distributed sampler come from the
launcher (Ray Train's `prepare_model` / `prepare_data_loader` in `crossdet_ray.tune`); the
engine only needs this worker's rank, the world size, those two wrap functions and a way to
agree with the other workers. It stays free of Ray: the collectives are torch.distributed's,
on the group the launcher made.

The recipe is the single-process one: `--batch-size` is the global batch of one optimizer
step, each of W workers takes batch / W, and DDP averages the gradients, so a W-worker step
changes the weights as a one-worker step on the same global batch does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class WorkerGroup:
    """This worker's place among `world_size` data-parallel workers."""

    rank: int
    world_size: int
    prepare_model: Callable[[nn.Module], nn.Module]  # wraps in DDP (on its device)
    prepare_loader: Callable[[DataLoader], DataLoader]  # adds a DistributedSampler
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL wants CUDA)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files, evaluates and reports; the others only train."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over every worker (each worker passes its own values)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every worker when it is True on any: all stop at the same batch."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def per_worker_batch(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            raise ValueError(f"--batch-size {global_batch} is not divisible by "
                             f"--workers-per-trial {self.world_size}: each worker takes an "
                             "equal share of the global batch")
        return global_batch // self.world_size


def single_process() -> WorkerGroup:
    """The group of one: no wrap, no collectives."""
    return WorkerGroup(rank=0, world_size=1, prepare_model=lambda model: model,
                       prepare_loader=lambda loader: loader)


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DDP wrap: its state dict has the plain (reference) keys."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
