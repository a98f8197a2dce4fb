"""What `fit` needs to know when it is one of several data-parallel workers.

The process group, the DistributedDataParallel wrap and the distributed sampler come from the
launcher (Ray Train's `prepare_model` / `prepare_data_loader` in `crossdet_ray.tune`); the
engine only needs this worker's rank, the world size, those two wrap functions and a way to
agree with the other workers. It stays free of Ray: the collectives are torch.distributed's,
on the group the launcher made.

The recipe is the single-process one: `--batch-size` is the global batch of one optimizer
step, each of W workers takes batch / W, and DDP averages the gradients, so a W-worker step
changes the weights as a one-worker step on the same global batch does. That holds only if
no layer looks across the batch: the fusion modules' BatchNorms do (their training statistics
are the batch's), so in a group they take the global batch's statistics (`GlobalBatchNorm2d`).
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

    def distribute(self, model: nn.Module) -> nn.Module:
        """The model this worker trains: BatchNorm over the global batch, then the DDP wrap."""
        if self.world_size > 1:
            model = GlobalBatchNorm2d.convert(model)
        return self.prepare_model(model)

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


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch, over every
    data-parallel worker, as on one process holding the whole batch.

    torch's SyncBatchNorm does this on GPUs only; this one uses a differentiable all-reduce
    (`_SumOverWorkers`), so it works on any backend (gloo on the CPU, NCCL). The backward
    all-reduce sends each worker's share of the statistics' gradient to every worker, and
    DDP's gradient mean then gives the one-process gradient. Outside training (evaluation on
    the main worker alone) it is a plain BatchNorm2d; its parameters, buffers and state-dict
    keys are BatchNorm2d's, so checkpoints load into the plain model.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(input)
        features = input.float()
        dims = (0, 2, 3)
        count = torch.tensor([features.numel() / features.shape[1]], device=features.device)
        # Two passes (mean, then the centred squares): E[x^2] - E[x]^2 loses digits.
        total = _summed(torch.cat([features.sum(dims), count]))
        items = total[-1]
        mean = total[:-1] / items
        centred = features - mean[None, :, None, None]
        variance = _summed((centred * centred).sum(dims)) / items
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), items.item())
        scale = torch.rsqrt(variance + self.eps)
        output = centred * scale[None, :, None, None]
        if self.affine:
            output = output * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor,
                              items: float) -> None:
        """As BatchNorm2d: momentum (or the cumulative mean), the unbiased variance."""
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        unbiased = variance * (items / max(items - 1, 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """`module` with each BatchNorm2d replaced by one of these (same parameters/buffers)."""
        if type(module) is nn.BatchNorm2d:
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device=_device_of(module))
            converted.load_state_dict(module.state_dict())
            converted.train(module.training)
            if module.affine:
                converted.weight.requires_grad_(module.weight.requires_grad)
                converted.bias.requires_grad_(module.bias.requires_grad)
            return converted
        for name, child in module.named_children():
            replaced = cls.convert(child)
            if replaced is not child:
                setattr(module, name, replaced)
        return module


class _SumOverWorkers(torch.autograd.Function):
    """y = the sum of every worker's x. Each worker's loss uses its own copy of y, so the
    gradient of the total loss with respect to a worker's x is the sum of every worker's
    gradient of y: an all-reduce again. Written out, not torch's functional all-reduce: in
    torch 2.9 that has no backward, and the statistics' gradient was silently dropped."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over every worker; its gradient is the sum of theirs."""
    return _SumOverWorkers.apply(tensor)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
