"""The CrossAttentionDet checkpoint dict, and loading one safely.

The reference stores {'epoch', 'backbone', 'model_state_dict', 'optimizer_state_dict',
'scheduler_state_dict', 'loss', 'best_loss', 'best_epoch', 'config'}; we store the same keys
(plus a `history` of plain lists) so checkpoints move both ways, and only plain types so that
`torch.load(..., weights_only=True)` accepts them.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from crossdet_ray.engine.storage import RunStorage

CHECKPOINT_KEYS = (
    "epoch",
    "backbone",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "loss",
    "best_loss",
    "best_epoch",
    "config",
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, unreadable or of another backbone."""


def epoch_checkpoint_name(epoch: int, loss: float) -> str:
    """The reference's file name, e.g. `epoch_001_loss_2.3456.pth`."""
    return f"epoch_{epoch:03d}_loss_{loss:.4f}.pth"


def build_checkpoint(
    *,
    epoch: int,
    backbone: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss: float,
    best_loss: float,
    best_epoch: int,
    config: dict[str, Any],
    history: dict[str, list],
    num_classes: int,
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "backbone": backbone,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "loss": float(loss),
        "best_loss": float(best_loss),
        "best_epoch": int(best_epoch),
        "config": dict(config),
        "history": {k: list(v) for k, v in history.items()},
        "num_classes": int(num_classes),
    }


def snapshot(value: Any) -> Any:
    """A copy of a checkpoint dict whose tensors are CPU clones, safe to save while training
    goes on (the optimizer updates the live tensors in place)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class SnapshotBuffers:
    """`snapshot`, into CPU buffers kept from one epoch to the next.

    A fresh snapshot of mit_b5's checkpoint allocates 1.6 GB each epoch: page faults for every
    page, and the memory handed back to the system once the file is written. Copying into the
    previous epoch's buffers is a plain memory copy. The caller must know that the previous
    snapshot is no longer read (its write has finished) before taking the next.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, value: Any, path: tuple = ()) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            buffer = self._buffers.get(path)
            if (buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype
                    or buffer.stride() != value.stride()):
                buffer = snapshot(value)
                self._buffers[path] = buffer
            else:
                buffer.copy_(value)
            return buffer
        if isinstance(value, dict):
            return {k: self.take(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.take(v, path + (i,)) for i, v in enumerate(value))
        return value

    def clear(self) -> None:
        self._buffers.clear()


def _lower_this_threads_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19), where the OS allows one thread.

    On Linux a nice value belongs to a thread, not to the whole process. The writer thread
    then runs mostly when a core would otherwise idle, instead of taking a core from
    torch's threads, whose parallel regions all wait for the slowest thread.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # a sandbox without setpriority: the write runs at normal priority
        pass


class BackgroundWriter:
    """Runs file writes one at a time on a thread, so the next epoch trains meanwhile.

    The thread runs at the lowest CPU priority (`_lower_this_threads_priority`): a write
    that competes with training for the cores made the next epoch's first step several
    times slower on a two-core machine.

    `submit` first waits for the previous write, so at most one is in flight; a failed write
    (a full disk, a lost bucket) is raised in the training thread by `raise_if_failed`,
    which the training loop calls at every batch, or at the next `submit` or `wait`.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="checkpoint-writer",
                                                initializer=_lower_this_threads_priority)
        self._pending = self._executor.submit(write, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def raise_if_failed(self) -> None:
        """Raise the write's error now if it already failed; never blocks."""
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None


def read_checkpoint_file(path: str | Path) -> tuple[Any, str]:
    """What a checkpoint file holds (a path or a bucket URI; loaded on the CPU with
    weights_only=True) and its name for messages (a URI without its options). The one reader
    of checkpoint files: resuming (load_checkpoint) and inference (engine.inference) use it.
    CheckpointError naming the file when it is missing or cannot be read."""
    storage, name = RunStorage.for_file(path)
    source = storage.uri(name)
    try:
        return storage.load_torch_file(name), source
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {source} does not exist") from error
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        # torch's first sentence says what failed; the rest is advice about trusting pickles.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise CheckpointError(f"checkpoint {source} cannot be read ({reason}): a damaged file "
                              "or not a torch checkpoint") from error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint to resume training from; CheckpointError when it is not one."""
    return validate_checkpoint(*read_checkpoint_file(path))


def validate_checkpoint(checkpoint: Any, source: str) -> dict[str, Any]:
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"{source} is not a CrossAttentionDet checkpoint (no 'model_state_dict'); "
            "a weights-only file cannot resume training"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; it cannot resume training")
    return checkpoint
