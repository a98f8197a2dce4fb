"""A trial with several data-parallel workers: Ray Train's TorchTrainer inside the Tune trial.

The trial process (a Tune function trial) launches W workers with Ray Train (Train V2, as
Ray's docs show for Tune + Train): NCCL on GPUs, gloo on the CPU, each worker one whole GPU or
its share of the trial's CPUs. Ray Train makes the process group; `prepare_model` wraps the
detector in DistributedDataParallel and `prepare_data_loader` gives each worker its part of
every epoch. The training loop is the engine's `fit`, unchanged but for its `WorkerGroup`.

Only the main worker (rank 0) writes the seed files and checkpoints. It announces each
committed epoch through an `EpochRelay` to this trial process, which `tune.report`s it with
the pointer checkpoint and answers only then, so the worker writes the epoch's rows after Tune
has the checkpoint: the same commit order as a one-worker trial (engine/run_logs.py).

Failures: Ray Train itself never retries (its FailureConfig is 0); a lost or killed worker
fails the TorchTrainer, hence the Tune trial, and Tune's `--max-failures` restarts the trial,
whose every worker resumes from the same checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.util.queue import Empty, Queue

from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.host_memory import retain_freed_host_memory
from crossdet_ray.engine.parallel import WorkerGroup
from crossdet_ray.engine.run_logs import ResumePoint
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import NullListener, TrainingStopped, fit
from crossdet_ray.tune.reporter import TrialReporter, announce_to_tune
from crossdet_ray.tune.resources import TrialResources, torch_threads_for
from crossdet_ray.tune.run_control import TrialControl
from crossdet_ray.tune.trial_runtime import (dataset_for_trial, run_fit, this_process, trial_device,
                                             trial_writer)

logger = logging.getLogger(__name__)

RELAY_POLL_SECONDS = 0.5


@dataclass
class RelayClient:
    """The main worker's end of the relay: picklable, it travels in the loop's config."""

    requests: Queue
    replies: Queue

    def announce(self, metrics: dict[str, Any], pointer: dict[str, Any]) -> None:
        """Tell Tune of a committed epoch; returns once Tune has registered it."""
        self.requests.put(("epoch", metrics, pointer))
        status, message = self.replies.get()
        if status != "ok":
            raise RuntimeError(f"the trial process could not report epoch {pointer['epoch']} "
                               f"to Tune: {message}")

    def stopped(self) -> None:
        """Training stopped on request (Ctrl-C): the trial should wait for Tune, not finish."""
        self.requests.put(("stopped", None, None))


class EpochRelay:
    """The trial process's end: a thread that reports the main worker's epochs to Tune."""

    def __init__(self):
        # Zero CPUs: the queues must never wait for (or take) a slot the workers need.
        options = {"num_cpus": 0}
        self.client = RelayClient(Queue(actor_options=options), Queue(actor_options=options))
        self.stop_requested = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="epoch-relay", daemon=True)

    def __enter__(self) -> "EpochRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()  # the workers are gone: serve what they left, then end
        self._thread.join(timeout=30)

    def _serve(self) -> None:
        while True:
            try:
                kind, metrics, pointer = self.client.requests.get(timeout=RELAY_POLL_SECONDS)
            except Empty:
                if self._done.is_set():
                    return
                continue
            except ray.exceptions.RayError:
                return  # the queue is gone: the trial is ending
            if kind == "stopped":
                self.stop_requested = True
                continue
            try:
                announce_to_tune(metrics, pointer)
            except BaseException as error:  # SystemExit: Tune ended the trial after the report
                self.client.replies.put(("error", f"{type(error).__name__}: {error}"))
                raise
            self.client.replies.put(("ok", None))


def train_with_workers(config: dict[str, Any], train_config: TrainConfig,
                       resources: TrialResources, trial_storage: RunStorage,
                       resume: ResumePoint, trial_id: str, entered_at: float) -> bool:
    """Train on `resources.workers` Ray Train workers; False when stopped on request."""
    from ray.train.torch import TorchTrainer

    trial = config["trial"]
    use_gpu = resources.gpu > 0
    worker = resources.worker_bundle()
    with EpochRelay() as relay:
        loop_config = {
            "trial_config": config, "train": train_config.to_dict(), "storage": trial_storage,
            "resume_relative": resume.relative, "log_entry": resume.log_entry,
            "unreadable": resume.unreadable, "trial_id": trial_id, "relay": relay.client,
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
                # Ray Train's own run state only (our files are the main worker's): kept on
                # the trial's node, out of the run directory.
                name=f"{trial['name']}_{trial_id}_{int(time.time())}",
                storage_path=tempfile.gettempdir() + "/crossdet_ray_train",
                failure_config=ray.train.FailureConfig(max_failures=0),
                # Ray Train routes every print() of its workers to its logger, past the
                # engine's redirect of pycocotools' progress: keep print() as it is.
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        )
        logger.info("%s: training on %d data-parallel workers (%s each)", trial["name"],
                    resources.workers, worker)
        trainer.fit()
    return not relay.stop_requested


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
        try:
            fit(train_config, trial["backbone"], data_dir, listener=NullListener(),
                resume_from=resume_from, device=device, group=group)
        except TrainingStopped:
            pass  # the main worker stopped at this same batch and tells the trial process
        return

    relay: RelayClient = loop_config["relay"]
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
    finished = run_fit(
        lambda: fit(train_config, trial["backbone"], data_dir,
                    listener=TrialReporter(writer, announce=relay.announce),
                    resume_from=resume_from, device=device, group=group),
        writer, control, trial["name"])
    if not finished:
        relay.stopped()
