"""The function trainable: one Ray Tune trial trains one backbone (at one learning rate).

It builds everything from its `config`, restores from `tune.get_checkpoint()` when Tune
restarts it (a crash, a lost node, `--resume`), and leaves all reporting to the trial reporter.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Any

import ray
import torch
from ray import tune

from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.run_logs import SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import fit
from crossdet_ray.tune.datasets import ensure_dataset
from crossdet_ray.tune.reporter import TrialReporter, load_trial_checkpoint
from crossdet_ray.tune.resources import torch_threads_for

logger = logging.getLogger(__name__)


def trial_device(granted_gpus: float) -> torch.device:
    """The device for a trial: its GPU when Ray granted one CUDA can see, else the CPU."""
    if granted_gpus > 0:
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning(
            "this trial was granted %g GPU (CUDA_VISIBLE_DEVICES=%s) but CUDA sees no GPU on "
            "node %s: TRAINING ON THE CPU. Check the node's CUDA driver, or pass "
            "--gpus-per-trial 0.", granted_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"),
            socket.gethostname())
    return torch.device("cpu")


def train_backbone(config: dict[str, Any]) -> None:
    """Ray Tune function trainable; `config` is built by `crossdet_ray.tune.launcher`."""
    entered_at = time.time()
    trial = config["trial"]
    train_config = TrainConfig.from_dict(config["train"]).replace(lr=trial["lr"])
    resources = config["resources"][trial["backbone"]]
    torch.set_num_threads(torch_threads_for(resources["cpu"]))
    device = trial_device(resources["gpu"])

    storage = tune.get_context().get_storage()
    trial_storage = RunStorage(storage.storage_filesystem, storage.trial_fs_path)
    writer = SeedLogWriter(
        trial_storage, trial["backbone"], train_config.to_dict(),
        keep_checkpoints=config.get("keep_checkpoints"),
        extra_info={
            "trial_name": trial["name"], "lr": trial["lr"], "node": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "resources": resources, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "torch_threads": torch.get_num_threads(), "trainable_started_at": entered_at,
        },
    )

    tune_checkpoint = tune.get_checkpoint()
    resume_from = (load_trial_checkpoint(tune_checkpoint, trial_storage)
                   if tune_checkpoint is not None else None)

    data_dir = ensure_dataset(config["data"])
    try:
        fit(train_config, trial["backbone"], data_dir, listener=TrialReporter(writer),
            resume_from=resume_from, device=device)
    except Exception as error:
        writer.mark_failed(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise
