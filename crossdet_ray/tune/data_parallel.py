"""A trial with several data-parallel workers: Ray Train's TorchTrainer inside the Tune trial.

The trial process (a Tune function trial) launches W workers with Ray Train (Train V2), as
Ray's guide to Train inside Tune shows: NCCL on GPUs, gloo on the CPU, each worker one whole GPU
or its share of the trial's CPUs. Ray Train makes the process group; `prepare_model` wraps the
detector in DistributedDataParallel and `prepare_data_loader` gives each worker its part of
every epoch. The training loop is the engine's `fit`, unchanged but for its `WorkerGroup`.

Only the main worker (rank 0) writes the seed files and checkpoints. Each committed epoch is
`ray.train.report`ed by every worker (Ray Train's reports are collective; the others report
nothing of their own) and Ray Train's `TuneReportCallback` hands rank 0's metrics to this
trial's Tune session. Tune then holds each epoch's metrics but no checkpoint of its own: a
restarted trial resumes from the seed files, which the main worker wrote before reporting.

Failures: Ray Train itself never retries (its FailureConfig is 0); a lost or killed worker
fails the TorchTrainer, hence the Tune trial, and Tune's `--max-failures` restarts the trial,
whose every worker resumes from the same checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.host_memory import retain_freed_host_memory
from crossdet_ray.engine.parallel import WorkerGroup
from crossdet_ray.engine.run_logs import ResumePoint
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import NullListener, TrainingStopped, fit
from crossdet_ray.tune.reporter import TrialReporter
from crossdet_ray.tune.resources import TrialResources, torch_threads_for
from crossdet_ray.tune.run_control import TrialControl
from crossdet_ray.tune.trial_runtime import (dataset_for_trial, run_fit, this_process, trial_device,
                                             trial_writer)

logger = logging.getLogger(__name__)


def report_through_train(metrics: dict[str, Any], pointer: dict[str, Any]) -> None:
    """The main worker's report of a committed epoch (from its commit thread): to Ray Train,
    whose TuneReportCallback passes it on to Tune. The seed checkpoint it names is already on
    storage; a restart finds it there."""
    ray.train.report(metrics)


class PeerReports(NullListener):
    """A worker other than the main one: joins each epoch's collective `ray.train.report`,
    from a thread of its own, as the main worker reports from its commit thread: training
    never waits for the main worker's checkpoint write."""

    def __init__(self):
        self._reports = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-report")
        self._last: Future | None = None

    def on_epoch_end(self, metrics, checkpoint) -> None:
        self._last = self._reports.submit(ray.train.report, {})

    def wait(self) -> None:
        """Return once this worker's last report is taken (the main worker's is then too)."""
        if self._last is not None:
            self._last.result()
        self._reports.shutdown()


def train_with_workers(config: dict[str, Any], train_config: TrainConfig,
                       resources: TrialResources, trial_storage: RunStorage,
                       resume: ResumePoint, control: TrialControl, entered_at: float) -> bool:
    """Train on `resources.workers` Ray Train workers; False when stopped on request."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = config["trial"]
    use_gpu = resources.gpu > 0
    worker = resources.worker_bundle()
    loop_config = {
        "trial_config": config, "train": train_config.to_dict(), "storage": trial_storage,
        "resume_relative": resume.relative, "log_entry": resume.log_entry,
        "unreadable": resume.unreadable, "trial_id": control.trial_id,
        "threads": torch_threads_for(worker["CPU"]), "use_gpu": use_gpu,
        "entered_at": entered_at,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=use_gpu,
            resources_per_worker={k: v for k, v in worker.items()}),
        run_config=ray.train.RunConfig(
            # Ray Train's own run state only (our files are the main worker's): kept on the
            # trial's node, out of the run directory.
            name=f"{trial['name']}_{control.trial_id}_{int(time.time())}",
            storage_path=tempfile.gettempdir() + "/crossdet_ray_train",
            failure_config=ray.train.FailureConfig(max_failures=0),
            callbacks=[TuneReportCallback()],
            # Ray Train routes every print() of its workers to its logger, past the
            # engine's redirect of pycocotools' progress: keep print() as it is.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )
    logger.info("%s: training on %d data-parallel workers (%s each)", trial["name"],
                resources.workers, worker)
    trainer.fit()
    return not control.stop_requested()


def _placement(use_gpu: bool) -> dict[str, Any]:
    context = ray.train.get_context()
    where = {"rank": context.get_world_rank(), "local_rank": context.get_local_rank(),
             **this_process()}
    if use_gpu and torch.cuda.is_available():
        where["cuda_device"] = torch.cuda.get_device_name(ray.train.torch.get_device())
    return where


def ray_worker_group(device: torch.device) -> WorkerGroup:
    """This Ray Train worker's `WorkerGroup`: Ray Train's process group, DDP wrap and sampler."""
    context = ray.train.get_context()
    # The depthwise convs' (C, 1, 3, 3) weight gradients come back with a different (equally
    # dense) stride order than DDP's bucket views: DDP copies them and warns once per worker.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return WorkerGroup(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=device,
        prepare_model=lambda model: ray.train.torch.prepare_model(model, move_to_device=device),
        prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(
            loader, move_to_device=False))


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the engine's fit on its share of each global batch."""
    config = loop_config["trial_config"]
    trial = config["trial"]
    train_config = TrainConfig.from_dict(loop_config["train"])
    storage: RunStorage = loop_config["storage"]
    world_size = ray.train.get_context().get_world_size()
    torch.set_num_threads(loop_config["threads"])
    retained = retain_freed_host_memory()  # a worker process exists to train (engine/host_memory)
    device = (ray.train.torch.get_device() if loop_config["use_gpu"] and torch.cuda.is_available()
              else trial_device(1.0 if loop_config["use_gpu"] else 0.0))
    # Every rank gathers where every rank runs; the main worker records it.
    placements: list[Any] = [None] * world_size
    dist.all_gather_object(placements, _placement(loop_config["use_gpu"]))

    group = ray_worker_group(device)
    relative = loop_config["resume_relative"]
    resume_from = storage.load_torch(relative) if relative else None
    # Every worker, on its own node: a bucket dataset is fetched once per node.
    data_dir, fetched = dataset_for_trial(config, storage, None, None)

    if not group.is_main:
        peer = PeerReports()
        try:
            fit(train_config, trial["backbone"], data_dir, listener=peer,
                resume_from=resume_from, device=device, group=group)
        except TrainingStopped:
            return  # the main worker stopped at this same batch; Tune ends the trial
        peer.wait()
        return

    writer = trial_writer(config, storage, train_config, {
        **placements[0], "torch_threads": torch.get_num_threads(),
        "host_memory_retained": retained,
        "trainable_started_at": loop_config["entered_at"], "workers": world_size,
        "per_worker_batch": group.per_worker_batch(train_config.batch_size),
        "worker_placements": placements})
    writer.recovered_entry = loop_config["log_entry"]
    if fetched:  # the main worker's node; each other node's fetch is in its worker's log
        writer.info["dataset_fetch"] = fetched
    if loop_config["unreadable"]:
        writer.info["unreadable_checkpoints"] = loop_config["unreadable"]
    control = TrialControl(config.get("run_control"), loop_config["trial_id"])
    control.watch_for_stop(writer.close_for_stop)
    run_fit(lambda: fit(train_config, trial["backbone"], data_dir,
                        listener=TrialReporter(writer, announce=report_through_train),
                        resume_from=resume_from, device=device, group=group),
            writer, control, trial["name"])
