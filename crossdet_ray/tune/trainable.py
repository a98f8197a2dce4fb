"""The function trainable: one Ray Tune trial trains one backbone (at one learning rate).

It builds everything from its `config`, and when Tune restarts it (a crash, a lost node,
`--resume`) continues after the newest safe epoch: the newest logged in its own
epoch_metrics.csv or announced to Tune, whichever is later (Tune's saved state can lag behind
the logs when the driver was killed), skipping damaged files. All reporting is the trial
reporter's.

A trial with one worker trains in this process. A trial with several (`--workers-per-trial`)
starts them with Ray Train (tune/data_parallel.py); its main worker then writes the files and
Ray Train reports its epochs to this trial's Tune session.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ray import tune

from crossdet_ray.config import TrainConfig
from crossdet_ray.tune.resources import TrialResources, torch_threads_for
from crossdet_ray.tune.run_control import TrialControl
from crossdet_ray.tune.trial_runtime import (
    GpuNotVisibleError,
    dataset_for_trial,
    fail_without_retry,
    quiet_checkpoint_notices,
    run_fit,
    this_process,
    trial_device,
    trial_writer,
)

if TYPE_CHECKING:
    from crossdet_ray.engine.run_logs import ResumePoint
    from crossdet_ray.engine.storage import RunStorage

# The training stack (torch, torchvision, the engine) is imported inside the functions that
# use it: the driver imports this module to hand `train_backbone` to Tune, and should not pay
# seconds of imports for what only the trial processes run.

logger = logging.getLogger(__name__)


def train_backbone(config: dict[str, Any]) -> None:
    """Ray Tune function trainable; `config` is built by `crossdet_ray.tune.launcher`."""
    entered_at = time.time()
    from crossdet_ray.engine.checkpoint import CheckpointError
    from crossdet_ray.engine.run_logs import find_resume_point
    from crossdet_ray.engine.storage import RunStorage
    from crossdet_ray.tune.failures import refuse_hopeless_memory_retry
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
    # After an out-of-memory kill while it ran alone, a retry would be killed again: none.
    refuse_hopeless_memory_retry(trial_storage, forbid_retry=control.forbid_retry)
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
                                      control, entered_at)
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
