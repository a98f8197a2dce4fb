"""The function trainable: one Ray Tune trial trains one backbone (at one learning rate).

It builds everything from its `config`, and when Tune restarts it (a crash, a lost node,
`--resume`) continues after the newest safe epoch: the newest logged in its own
epoch_metrics.csv or announced to Tune, whichever is later (Tune's saved state can lag behind
the logs when the driver was killed), skipping damaged files. All reporting is the trial
reporter's.

A trial with one worker trains in this process. A trial with several (`--workers-per-trial`)
starts them with Ray Train (tune/data_parallel.py); its main worker then writes the files and
this process relays its epochs to Tune.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray import tune

from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.errors import DiskFullError
from crossdet_ray.tune.resources import TrialResources, torch_threads_for
from crossdet_ray.tune.run_control import TrialControl

if TYPE_CHECKING:
    import torch

    from crossdet_ray.engine.run_logs import ResumePoint, SeedLogWriter
    from crossdet_ray.engine.storage import RunStorage

# The training stack (torch, torchvision, the engine) is imported inside the functions that
# use it: the driver imports this module to hand `train_backbone` to Tune, and should not pay
# seconds of imports for what only the trial processes run.

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
    from crossdet_ray.data.remote import DATASET_LISTING_FILE, DatasetChangedError, RemoteListing
    from crossdet_ray.tune.datasets import DataNotOnNodeError, node_dataset

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


# Ray logs "Checkpoint successfully created at: ..." at every epoch of every trial; our own
# progress lines already say each epoch ended, and epoch_metrics.csv where its file is.
RAY_CHECKPOINT_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")


def quiet_checkpoint_notices() -> None:
    for name in RAY_CHECKPOINT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def train_backbone(config: dict[str, Any]) -> None:
    """Ray Tune function trainable; `config` is built by `crossdet_ray.tune.launcher`."""
    entered_at = time.time()
    from crossdet_ray.engine.checkpoint import CheckpointError
    from crossdet_ray.engine.run_logs import find_resume_point
    from crossdet_ray.engine.storage import RunStorage
    from crossdet_ray.tune.failures import wait_for_memory_before_retry
    from crossdet_ray.tune.reporter import read_checkpoint_pointer

    quiet_checkpoint_notices()
    trial = config["trial"]
    # --init-from: the source run's best_map_model.pth for this backbone (none: fresh weights).
    train_config = TrainConfig.from_dict(config["train"]).replace(
        lr=trial["lr"], init_weights=(config.get("init_weights") or {}).get(trial["backbone"]))
    resources = TrialResources(**config["resources"][trial["backbone"]])

    storage = tune.get_context().get_storage()
    trial_storage = RunStorage(storage.storage_filesystem, storage.trial_fs_path)
    trial_id = tune.get_context().get_trial_id()
    control = TrialControl(config.get("run_control"), trial_id)
    # After an out-of-memory kill, a retry waits for memory to free (or is not made at all).
    wait_for_memory_before_retry(trial_storage, forbid_retry=control.forbid_retry)
    tune_checkpoint = tune.get_checkpoint()
    announced = read_checkpoint_pointer(tune_checkpoint) if tune_checkpoint is not None else None
    try:
        resume = find_resume_point(trial_storage, announced)
    except CheckpointError as error:
        writer = trial_writer(config, trial_storage, train_config, this_process())
        # The files will not mend themselves on a restart.
        fail_without_retry(writer, control, error, "checkpoint")
        raise

    if resources.data_parallel:
        from crossdet_ray.tune.data_parallel import train_with_workers

        finished = train_with_workers(config, train_config, resources, trial_storage, resume,
                                      trial_id, entered_at)
    else:
        finished = _train_here(config, train_config, resources, trial_storage, resume, control,
                               entered_at)
    if not finished:
        # Returning would mark the trial finished and raising would fail it: neither is true.
        threading.Event().wait()


def _train_here(config: dict[str, Any], train_config: TrainConfig, resources: TrialResources,
                trial_storage: RunStorage, resume: ResumePoint, control: TrialControl,
                entered_at: float) -> bool:
    """One worker: train in this process."""
    import torch

    from crossdet_ray.engine.host_memory import retain_freed_host_memory
    from crossdet_ray.engine.train import fit
    from crossdet_ray.tune.reporter import TrialReporter

    trial = config["trial"]
    torch.set_num_threads(torch_threads_for(resources.cpu))
    # This process exists to train: no page faults for memory the next step needs again.
    retained = retain_freed_host_memory()
    writer = trial_writer(config, trial_storage, train_config, {
        **this_process(), "torch_threads": torch.get_num_threads(),
        "host_memory_retained": retained,
        "trainable_started_at": entered_at, "workers": 1,
        "per_worker_batch": train_config.batch_size})
    try:
        device = trial_device(resources.gpu)
    except GpuNotVisibleError as error:
        fail_without_retry(writer, control, error, "gpu")
        raise
    writer.recovered_entry = resume.log_entry
    if resume.unreadable:
        writer.info["unreadable_checkpoints"] = resume.unreadable
    # Ctrl-C: finish and announce the epoch being saved, accept no other; Tune then stops us.
    control.watch_for_stop(writer.close_for_stop)
    data_dir, fetched = dataset_for_trial(config, trial_storage, writer, control)
    if fetched:
        writer.info["dataset_fetch"] = fetched
    return run_fit(
        lambda: fit(train_config, trial["backbone"], data_dir, listener=TrialReporter(writer),
                    resume_from=resume.checkpoint, device=device),
        writer, control, trial["name"])
