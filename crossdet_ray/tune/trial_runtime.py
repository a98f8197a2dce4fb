"""What a trial process needs whether it trains itself or through data-parallel workers
(tune/trainable.py, tune/data_parallel.py): its device, node, dataset, log writer, and the
training call with its failure handling.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from typing import TYPE_CHECKING, Any, Callable

import ray

from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.errors import DiskFullError
from crossdet_ray.tune.ray_compat import RAY_CHECKPOINT_LOGGERS
from crossdet_ray.tune.run_control import TrialControl

if TYPE_CHECKING:
    import torch

    from crossdet_ray.engine.run_logs import SeedLogWriter
    from crossdet_ray.engine.storage import RunStorage

logger = logging.getLogger(__name__)

LOGICAL_GPUS_ENV = "CROSSDET_LOGICAL_GPUS"  # "1": Ray's GPUs may be logical (tests)


class GpuNotVisibleError(RuntimeError):
    """Ray granted this trial a GPU that CUDA cannot see: training on the CPU would bill a GPU
    node for nothing, and a restart on the same node sees the same."""


def trial_device(granted_gpus: float) -> torch.device:
    """The device for a trial: its GPU when Ray granted one; the CPU when it granted none.

    A granted GPU that CUDA cannot see raises GpuNotVisibleError naming the node and why,
    unless CROSSDET_LOGICAL_GPUS=1 says Ray's GPUs are logical (tests on a CPU machine): then
    the trial trains on the CPU, with a warning.
    """
    import torch

    if granted_gpus <= 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    node = this_node()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if os.environ.get(LOGICAL_GPUS_ENV) == "1":
        logger.warning("this trial was granted %g GPU (CUDA_VISIBLE_DEVICES=%s) but CUDA sees "
                       "no GPU on node %s: TRAINING ON THE CPU (%s=1: logical GPUs)",
                       granted_gpus, visible, node, LOGICAL_GPUS_ENV)
        return torch.device("cpu")
    reason = ("this torch is a CPU-only build (torch.version.cuda is None): install a CUDA "
              "build on the node" if torch.version.cuda is None else
              f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: check "
              "the node's NVIDIA driver with nvidia-smi")
    raise GpuNotVisibleError(
        f"this trial was granted {granted_gpus:g} GPU on node {node} "
        f"(CUDA_VISIBLE_DEVICES={visible}) but CUDA cannot see it: {reason}. Not training on "
        f"the CPU of a GPU node; pass --gpus-per-trial 0 to train on CPUs (tests with Ray's "
        f"logical GPUs set {LOGICAL_GPUS_ENV}=1)")


def this_node() -> str:
    """This node as messages name it: host name and IP."""
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"


def fail_without_retry(writer: SeedLogWriter | None, control: TrialControl | None,
                       error: Exception, failure_kind: str) -> None:
    """Record a failure that a restart cannot mend, and ask the driver not to restart."""
    if writer is not None:
        writer.mark_failed(str(error), failure_kind=failure_kind)
    if control is not None:
        control.forbid_retry()


def this_process() -> dict[str, Any]:
    """Where this process runs, for training_info.json."""
    return {"node": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def trial_writer(config: dict[str, Any], trial_storage: RunStorage, train_config: TrainConfig,
                 extra_info: dict[str, Any]) -> SeedLogWriter:
    from crossdet_ray.engine.run_logs import SeedLogWriter

    trial = config["trial"]
    return SeedLogWriter(
        trial_storage, trial["backbone"], train_config.to_dict(),
        keep_checkpoints=config.get("keep_checkpoints"),
        extra_info={"trial_name": trial["name"], "lr": trial["lr"],
                    "resources": config["resources"][trial["backbone"]], **extra_info})


def dataset_for_trial(config: dict[str, Any], trial_storage: RunStorage,
                      writer: SeedLogWriter | None, control: TrialControl | None
                      ) -> tuple[str, dict[str, Any] | None]:
    """The trial's dataset on this node, and how a bucket's got here (for training_info.json).

    A folder this node lacks, or a bucket object changed since the preflight, fails the trial
    without a retry: a restart would find the same.
    """
    from crossdet_ray.data.remote import DatasetChangedError, RemoteListing
    from crossdet_ray.run_files import DATASET_LISTING_FILE
    from crossdet_ray.data.resolve import DataNotOnNodeError, node_dataset

    spec = config["data"]
    try:
        # A bucket dataset's listing is a file of the run directory, the trial's parent.
        listing = (RemoteListing.from_json(trial_storage.parent().read_text(DATASET_LISTING_FILE))
                   if spec["kind"] == "remote" else None)
        data_dir, fetched = node_dataset(spec, listing=listing, node=this_node())
    except (DataNotOnNodeError, DatasetChangedError) as error:
        fail_without_retry(writer, control, error, "data")
        raise
    return data_dir, (fetched.to_dict() if fetched is not None else None)


def run_fit(train: Callable[[], Any], writer: SeedLogWriter, control: TrialControl,
            trial_name: str) -> bool:
    """Run `train`, recording a failure in the trial's files; False when stopped on request."""
    from crossdet_ray.engine.train import TrainingStopped

    try:
        train()
    except TrainingStopped:
        logger.info("%s: stopped on request after its last saved epoch; waiting for Tune to "
                    "end the trial", trial_name)
        return False
    except DiskFullError as error:
        # Restarting on the same full disk fails the same way: spend no --max-failures on it.
        fail_without_retry(writer, control, error, "disk_full")
        raise
    except Exception as error:
        writer.mark_failed(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise
    return True


def quiet_checkpoint_notices() -> None:
    """Ray logs "Checkpoint successfully created at: ..." at every epoch of every trial; our
    own progress lines already say each epoch ended, and epoch_metrics.csv where its file is."""
    for name in RAY_CHECKPOINT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
