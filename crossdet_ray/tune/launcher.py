"""Builds and runs the Tuner: one trial per backbone (x LR multiplier), on a local or remote Ray.

The run directory is Tune's experiment directory (`LOG_DIR/NAME`), so `Tuner.restore`,
`ResultGrid` and TensorBoard work on it, and our own files live beside Tune's.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from crossdet_ray.backbones import BACKBONE_NAMES, is_backbone, relative_cost
from crossdet_ray.config import DEFAULT_PENDING_TIMEOUT_S, TrainConfig
from crossdet_ray.data import check_dataset
from crossdet_ray.engine.json_files import dumps_json
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.run_files import (DATASET_LISTING_FILE, FINAL_SUMMARY_FILE, PLAN_FILE,
                                    RUN_CONFIG_FILE)
from crossdet_ray.data.remote import (RemoteListing, inspect_remote_dataset,
                                      is_remote, printable_uri)
from crossdet_ray.data.resolve import ensure_dataset, folder_spec, remote_spec, synthetic_spec
from crossdet_ray.tune.resources import (
    ClusterShape,
    TrialResources,
    check_feasible,
    cluster_gpu_memory_gb,
    assign_workers,
    parse_gpus_per_trial,
    check_batch_split,
    cluster_cpus_per_trial,
    node_totals,
    parse_workers_per_trial,
    plan_resources,
    stated_gpu_memory_gb,
)
from crossdet_ray.tune.cluster import (
    ClusterDiscoveryError,
    autoscaling_shape,
    launchable_shape,
    parse_plan_for,
    refuse_cpu_trials,
)
from crossdet_ray.tune.ray_compat import (RAY_TOKEN_NOTICE_LOGGER, restored_run_config,
                                          use_quiet_tune_console)
from crossdet_ray.tune.connection import RayConnectionError
from crossdet_ray.tune.connection import connect_ray as connect_to_ray
from crossdet_ray.tune.disk import disk_shortfall, estimate_run_bytes, free_bytes
from crossdet_ray.tune.failures import FailureRecorder
from crossdet_ray.tune.planner import (
    Allocation,
    GpuNode,
    Plan,
    TrialRequest,
    Workload,
    assign_gpu_types,
    format_plan,
    plan_trials,
)
from crossdet_ray.tune.pending import PendingTrialWatch, describe
from crossdet_ray.tune.progress import TrialLinesReporter
from crossdet_ray.tune.follow_up import (
    FollowUpError,
    mlflow_callback,
    mlflow_tracking_uri,
    resolve_init_weights,
)
from crossdet_ray.tune.reporter import read_checkpoint_pointer
from crossdet_ray.tune.run_control import (
    RunControlCallback,
    control_actor_name,
    graceful_interrupt,
    start_run_control,
)
from crossdet_ray.tune.summary import run_exit_code, summarise_run
from crossdet_ray.tune.trainable import train_backbone

logger = logging.getLogger(__name__)

UNLIMITED_RETRIES = -1  # --max-failures -1: Tune restarts a trial however often it fails
REMOTE_KEEP_CHECKPOINTS = 1  # epoch checkpoints per trial when --log-dir is a bucket
MLFLOW_EXPERIMENT = "crossdet_ray"  # every run's trials, told apart by their run_dir tag


class LaunchError(ValueError):
    """A user mistake found before any trial starts; the CLI prints it and exits non-zero."""


@dataclass
class LaunchConfig:
    """Everything the command line says about a run, beyond one trial's TrainConfig."""

    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None
    gpus_per_trial: str = "auto"
    workers_per_trial: str = "auto"
    cpus_per_trial: float | None = None
    address: str | None = None
    resume: str | None = None
    max_failures: int = 2
    lr_grid: list[float] = field(default_factory=list)
    scheduler: str = "fifo"
    keep_checkpoints: int | None = None
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    autoscaling: bool = False
    synthetic_images: int = 64
    synthetic_seed: int = 0
    synthetic_frame_size: int | str | None = None  # a side, or "HxW"
    synthetic_objects: str = "real"  # datasets.SYNTHETIC_OBJECTS
    preset: str | None = None  # the --preset the run's defaults came from (cli.PRESETS)
    verbose: int = 1
    skip_disk_check: bool = False  # start even when the run's estimated bytes do not fit
    plan_only: bool = False  # print and write the plan, train nothing
    plan_for: str | None = None  # plan for a cluster we do not have: "8x80", "2x4x80"
    plan: dict[str, Any] | None = None  # the plan this run trains by (kept in run_config.json)
    init_from: str | None = None  # a run directory: each backbone starts from its best_map_model
    mlflow: str | None = None  # a tracking URI, or follow_up.MLFLOW_DEFAULT (sqlite in the run)
    pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S  # 0: wait for nodes for ever

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["train"] = self.train.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LaunchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        kwargs["train"] = TrainConfig.from_dict(values.get("train", {}))
        return cls(**kwargs)


@dataclass
class TrialSpec:
    name: str
    backbone: str
    lr: float


@dataclass
class RunOutcome:
    run_dir: str
    summary: dict[str, Any]
    interrupted: bool
    dashboard_url: str | None
    plan_only: bool = False
    run_uri: str = ""  # run_dir with a bucket URI's options: what evaluation opens again
    nothing_to_resume: bool = False  # --resume of a run whose every trial had finished

    @property
    def exit_code(self) -> int:
        return run_exit_code({**self.summary, "interrupted": self.interrupted})


def trial_specs(backbones: list[str], lr: float, lr_grid: list[float]) -> list[TrialSpec]:
    """Every backbone, or every backbone x (lr x multiplier) for an LR search."""
    if not lr_grid:
        return [TrialSpec(b, b, lr) for b in backbones]
    return [TrialSpec(f"{b}_lr{lr * m:g}", b, lr * m) for b in backbones for m in lr_grid]


def start_order(specs: list[TrialSpec]) -> list[TrialSpec]:
    """Costliest backbone first, by the registry's relative training cost (the summary keeps
    the user's order).

    Tune starts trials in grid order, so the longest trial starts first and the run ends when
    it does; when trials queue for GPUs, longest-first also packs them tightest.
    """
    return sorted(specs, key=lambda s: relative_cost(s.backbone), reverse=True)


def default_run_name() -> str:
    return datetime.now().strftime("run_%Y%m%d_%H%M%S")


# -- Ray ---------------------------------------------------------------------------------------
def connect_ray(config: LaunchConfig) -> str | None:
    """Ray for this run (tune/connection.py); the dashboard's URL where there is one to log."""
    quiet_console()
    try:
        return connect_to_ray(config.address, dashboard=config.dashboard,
                              dashboard_host=config.dashboard_host).dashboard_url
    except RayConnectionError as error:
        raise LaunchError(str(error)) from error


class _TokenWarningFilter(logging.Filter):
    """Ray 2.60 warns at every start that token authentication is on; the dashboard line says
    once what that means for the user (how to log in)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def quiet_console() -> None:
    """No colour codes in logs that are not a terminal; Ray's token notice said our way;
    Tune's console quiet, so that our progress lines are the console."""
    use_quiet_tune_console()
    if not sys.stderr.isatty():
        os.environ["RAY_COLOR_PREFIX"] = "0"  # read by Ray's log printer in this process
    token_logger = logging.getLogger(RAY_TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, _TokenWarningFilter) for f in token_logger.filters):
        token_logger.addFilter(_TokenWarningFilter())


def cluster_shape() -> ClusterShape:
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    nodes = tuple(node_totals(r) for r in alive)
    local_gpu_memory = None
    if any(n["GPU"] > 0 for n in nodes):
        import torch  # only then: seconds of import on a small CPU-only driver

        if torch.cuda.is_available():
            local_gpu_memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return ClusterShape(total_cpus=sum(n["CPU"] for n in nodes),
                        total_gpus=sum(n["GPU"] for n in nodes), nodes=nodes,
                        gpu_memory_gb=cluster_gpu_memory_gb(alive, local_gpu_memory))


def nodes_of_shape(shape: ClusterShape) -> list[GpuNode]:
    """The planner's nodes; a GPU whose memory its node does not state has the shape's."""
    return [GpuNode(gpus=int(n.get("GPU", 0)),
                    gpu_memory_gb=stated_gpu_memory_gb(n) or shape.gpu_memory_gb,
                    cpus=n.get("CPU", 0)) for n in shape.nodes]


def workload_of(train: TrainConfig, data: dict[str, Any]) -> Workload:
    """What each trial trains: the usable frames less the test split, the epochs, the batch."""
    usable = int(data.get("report", {}).get("num_usable") or 0)
    train_frames = max(1, usable - math.ceil(train.test_size * usable))
    return Workload(train_frames=train_frames, epochs=train.epochs, batch_size=train.batch_size,
                    min_size=train.min_size, amp=train.amp,
                    activation_checkpointing=train.activation_checkpointing)


def plan_run(config: LaunchConfig, specs: list[TrialSpec], shape: ClusterShape,
             workload: Workload) -> tuple[dict[str, TrialResources], Plan]:
    """Each backbone's resources and the predicted hours of every trial.

    `--gpus-per-trial auto` on a cluster with GPUs lets the makespan planner choose shares,
    whole GPUs and workers (a number given to --workers-per-trial is kept); otherwise the
    user's shares (or the CPU) stand and the planner only predicts how long they take.
    """
    backbones = config.train.backbones
    request = parse_gpus_per_trial(config.gpus_per_trial, backbones)
    workers_request = parse_workers_per_trial(config.workers_per_trial, backbones)
    shares = plan_resources(request, backbones, max(len(config.lr_grid), 1), shape,
                            config.cpus_per_trial)
    cpus = next(iter(shares.values())).cpu
    requests = [TrialRequest(s.name, s.backbone) for s in start_order(specs)]
    nodes = nodes_of_shape(shape)
    if request.auto and shape.total_gpus > 0:
        workers = (None if workers_request.auto else
                   {b: int(workers_request.share_for(b)) for b in backbones})
        plan = plan_trials(requests, nodes, workload, cpus, workers=workers)
        chosen = {t.backbone: t for t in plan.trials}
        resources = {b: TrialResources(cpu=cpus, gpu=chosen[b].gpus, workers=chosen[b].workers)
                     for b in backbones}
    else:
        resources = assign_workers(shares, workers_request, config.train.batch_size)
        plan = plan_trials(requests, nodes, workload, cpus, fixed={
            b: Allocation(gpus=r.gpu, workers=r.workers) for b, r in resources.items()})
    resources = assign_gpu_types(
        resources, shape.nodes, workload,
        config.cpus_per_trial or cluster_cpus_per_trial(shape, len(specs)),
        cpus_given=config.cpus_per_trial is not None)
    # Each trial's own CPUs and GPU size as its node type gives them, not the first trial's.
    plan.trials = [dataclasses.replace(t, cpus=resources[t.backbone].cpu,
                                       gpu_memory_gb=resources[t.backbone].gpu_memory_gb)
                   for t in plan.trials]
    return resources, plan


def max_concurrent_trials(trials: list[TrialResources], shape: ClusterShape,
                          autoscaling: bool = False) -> int | None:
    """How many trials may run at once when some start Ray Train workers (None: no limit).

    A data-parallel trial's own process holds a little CPU while its workers wait for theirs;
    with too many such trials started, their processes can hold what their workers need and
    all wait for ever (a known pitfall of Train inside Tune). So at most as many trials run as
    fit whole (process and workers) in the cluster, in start order, and never fewer than one.
    An autoscaling cluster grows to fit, so it is not limited.
    """
    if autoscaling or not any(t.data_parallel for t in trials):
        return None
    free_cpu, free_gpu, running = shape.total_cpus, shape.total_gpus, 0
    for trial in trials:
        cpu = trial.cpu  # the process's share and its workers'
        if cpu > free_cpu + 1e-9 or trial.gpu > free_gpu + 1e-9:
            break
        free_cpu, free_gpu, running = free_cpu - cpu, free_gpu - trial.gpu, running + 1
    return max(running, 1)


def _trial_bundle(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    share = TrialResources(**config["resources"][config["trial"]["backbone"]])
    return tune.PlacementGroupFactory([share.as_bundle()])


def _trial_dirname(trial) -> str:
    return trial.config["trial"]["name"]


TRAINABLE = tune.with_resources(train_backbone, resources=_trial_bundle)


def installed_torch_version() -> str:
    """torch.__version__ (e.g. 2.14.1+cu130), read from torch/version.py when torch is not
    imported yet: the driver never needs torch itself, and importing it costs seconds."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = Path(folder, "version.py").read_text()
        except OSError:
            continue
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if match:
            return match.group(1)
    return importlib.metadata.version("torch")


# -- validation --------------------------------------------------------------------------------
def validate(config: LaunchConfig) -> None:
    train = config.train
    unknown = [b for b in train.backbones if not is_backbone(b)]
    if unknown:
        raise LaunchError(f"--backbones: unknown {', '.join(unknown)}; "
                          f"choose from {', '.join(BACKBONE_NAMES)}")
    if not train.backbones:
        raise LaunchError("--backbones: name at least one backbone")
    if len(set(train.backbones)) != len(train.backbones):
        raise LaunchError("--backbones: a backbone is named twice")
    positive = {"--epochs": train.epochs, "--batch-size": train.batch_size,
                "--lr-step-size": train.lr_step_size, "--min-size": train.min_size,
                "--max-size": train.max_size}
    for flag, value in positive.items():
        if value < 1:
            raise LaunchError(f"{flag} must be at least 1 (got {value})")
    if not train.lr > 0:
        raise LaunchError(f"--lr must be > 0 (got {train.lr})")
    if not train.lr_gamma > 0:
        raise LaunchError(f"--lr-gamma must be > 0 (got {train.lr_gamma})")
    if train.num_workers < 0:
        raise LaunchError(f"--num-workers must be >= 0 (got {train.num_workers})")
    if train.min_size > train.max_size:
        raise LaunchError(f"--min-size {train.min_size} is larger than --max-size {train.max_size}")
    if any(not m > 0 for m in config.lr_grid):
        raise LaunchError("--lr-grid: every multiplier must be > 0")
    if config.max_failures < UNLIMITED_RETRIES:
        raise LaunchError("--max-failures must be >= 0, or -1 for unlimited restarts (spot "
                          "nodes: README \"Spot GPU nodes\")")
    if config.keep_checkpoints is not None and config.keep_checkpoints < 1:
        raise LaunchError("--keep-checkpoints must be at least 1")
    if config.scheduler not in ("fifo", "asha"):
        raise LaunchError("--scheduler: choose fifo or asha")
    if config.scheduler == "asha" and not train.evaluate_every_epoch:
        raise LaunchError("--scheduler asha needs the per-epoch test mAP")
    if train.pretrained and not Path(train.pretrained).is_file():
        raise LaunchError(f"--pretrained: {train.pretrained} does not exist")
    # Resource flags too: a typo costs neither a dataset generation nor a cluster start.
    parse_gpus_per_trial(config.gpus_per_trial, train.backbones)
    workers = parse_workers_per_trial(config.workers_per_trial, train.backbones)
    if not workers.auto:  # the numbers given: the batch split needs no cluster to check
        for backbone in train.backbones:
            check_batch_split(backbone, train.batch_size, int(workers.share_for(backbone)))
    if config.plan_for:
        parse_plan_for(config.plan_for)  # a ResourceError: one line, exit 2


def resolve_data(config: LaunchConfig) -> tuple[dict[str, Any], RemoteListing | None]:
    """Preflight the dataset (the synthetic one is made first); a DatasetError stops the run.

    A bucket dataset is read, not downloaded (labels and frame headers): its listing, which
    every node checks its copy against, is returned to be written into the run directory.
    """
    listing = None
    if is_remote(config.train.data):
        started = time.monotonic()
        listing, report = inspect_remote_dataset(config.train.data, config.train.test_size)
        spec = remote_spec(listing)
        logger.info("dataset %s: preflight of %d objects (%.1f MB) took %.1f s; each node "
                    "fetches it once into its cache (CROSSDET_CACHE)",
                    printable_uri(listing.uri), len(listing.files), listing.total_bytes / 1e6,
                    time.monotonic() - started)
        data_dir = printable_uri(listing.uri)
    elif config.train.data:
        spec = folder_spec(config.train.data)
        data_dir = spec["path"]
        report = check_dataset(data_dir, config.train.test_size)
    else:
        spec = synthetic_spec(config.synthetic_images, config.synthetic_seed,
                              config.synthetic_frame_size, config.synthetic_objects)
        logger.info("no --data given: using the built-in synthetic RGB-thermal-event dataset "
                    "(%d frames, seed %d)", config.synthetic_images, config.synthetic_seed)
        data_dir = ensure_dataset(spec)
        report = check_dataset(data_dir, config.train.test_size)
    logger.info("dataset %s: %d usable frames of %d, %d boxes, %d classes", data_dir,
                report.num_usable, report.num_images, report.num_boxes, report.num_classes)
    return {**spec, "resolved_path": data_dir, "report": _report_dict(report)}, listing


def _report_dict(report) -> dict[str, Any]:
    values = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(vars(report))
    return json.loads(json.dumps(values, default=str))


# -- the run -----------------------------------------------------------------------------------
def launch(config: LaunchConfig) -> RunOutcome:
    """Run (or resume) every trial and write the cross-backbone summary."""
    if config.resume:
        return _resume(config)
    validate(config)
    config.name = config.name or default_run_name()
    if config.keep_checkpoints is None and is_remote(config.train.log_dir):
        # Every epoch of five backbones is ~125 GB in a bucket over 30 epochs; best and final
        # are kept whatever this says.
        config.keep_checkpoints = REMOTE_KEEP_CHECKPOINTS
        logger.warning("--log-dir %s is a bucket: keeping the last %d epoch checkpoint of each "
                       "trial (best and final are always kept); pass --keep-checkpoints N to "
                       "keep more", printable_uri(config.train.log_dir), REMOTE_KEEP_CHECKPOINTS)
    refuse_unusable_run_directory(config)
    init_weights, tracking_uri = _follow_up(config)
    # The preflight comes before Ray starts, so bad data fails fast with nothing started
    # (overlapping the two would save at most its 1.6 s per 10,000 frames).
    data, listing = resolve_data(config)
    specs = trial_specs(config.train.backbones, config.train.lr, config.lr_grid)
    request = parse_gpus_per_trial(config.gpus_per_trial, config.train.backbones)
    dashboard_url = None
    plan_for_launchable = config.autoscaling and request.auto
    if config.plan_for:
        shape = launchable_shape(parse_plan_for(config.plan_for))
    else:
        dashboard_url = connect_ray(config)
        shape = cluster_shape()
        if plan_for_launchable:
            # Not the nodes alive now (often a GPU-less head): those the autoscaler can add.
            shape = autoscaling_shape(shape)
        elif config.autoscaling and config.cpus_per_trial is None:
            # Fixed GPU shares: each trial's CPUs from the node types that will run it, not
            # from the nodes alive now (a CPU-less head would leave it 0.1 CPU).
            try:
                shape = autoscaling_shape(shape)
            except ClusterDiscoveryError as error:
                logger.warning("--autoscaling: %s; sharing out the CPUs of the nodes alive now "
                               "(pass --cpus-per-trial to choose)", error)
    plan, run_plan = plan_run(config, specs, shape, workload_of(config.train, data))
    if plan_for_launchable:
        refuse_cpu_trials({t.trial: t.gpus for t in run_plan.trials}, shape)
    config.plan = run_plan.to_dict()
    if config.plan_only:
        return _write_plan_only(config, run_plan)  # the command prints it
    logger.info("%s", format_plan(run_plan))
    check_feasible(plan, shape, autoscaling=config.autoscaling)

    check_disk_space(config, specs)
    run_storage = new_run_storage(config)
    if listing is not None:  # before any trial starts: each node's copy is checked against it
        run_storage.write_text(DATASET_LISTING_FILE, listing.to_json())
    param_space = {
        "trial": tune.grid_search([dataclasses.asdict(s) for s in start_order(specs)]),
        "train": config.train.to_dict(),
        "data": {k: v for k, v in data.items() if k != "report"},
        "resources": {b: r.to_dict() for b, r in plan.items()},
        "keep_checkpoints": config.keep_checkpoints,
        "run_control": control_actor_name(run_storage.uri()),
        "init_weights": {b: w["path"] for b, w in init_weights.items()},
        # The run's other flags, for the record (MLflow logs the whole config as params).
        "flags": {k: v for k, v in config.to_dict().items() if k != "train"},
    }
    run_storage.write_text(RUN_CONFIG_FILE, dumps_json({
        **config.to_dict(),
        "trials": [dataclasses.asdict(s) for s in specs],
        "resources": param_space["resources"],
        "data": data,
        "cluster": dataclasses.asdict(shape),
        "run_control": param_space["run_control"],
        "init_weights": init_weights,
        "mlflow_tracking_uri": tracking_uri,
        "ray_version": ray.__version__, "torch_version": installed_torch_version(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }))
    control = RunControlCallback(start_run_control(param_space["run_control"]),
                                 config.max_failures)
    watch = pending_watch(config, control, run_storage,
                          launchable=shape if config.autoscaling else None)
    tuner = tune.Tuner(
        TRAINABLE,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=_scheduler(config), trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_dirname, reuse_actors=False,
            max_concurrent_trials=max_concurrent_trials(
                [plan[s.backbone] for s in start_order(specs)], shape, config.autoscaling)),
        run_config=tune.RunConfig(
            name=config.name, storage_path=posixpath.dirname(run_storage.root),
            storage_filesystem=run_storage.filesystem, verbose=tune_verbosity(config.verbose),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[control, watch, FailureRecorder(run_storage, config.train.to_dict()),
                       *_mlflow_callbacks(tracking_uri, run_storage),
                       *progress_lines(config, data, run_storage)]),
    )
    return _fit_and_summarise(tuner, config, run_storage, dashboard_url, control, watch)


def pending_watch(config: LaunchConfig, control: RunControlCallback, run_storage: RunStorage,
                  launchable: ClusterShape | None) -> PendingTrialWatch:
    """--pending-timeout's watch; `launchable`: the node types an autoscaler can add."""
    kinds = collections.Counter(describe(node) for node in (launchable.nodes if launchable
                                                              else ()))
    return PendingTrialWatch(
        config.pending_timeout_s, control.stop_run, run_storage.uri(),
        launchable="; ".join(f"up to {n} x ({kind})" for kind, n in kinds.items()) or None)


def refuse_unusable_run_directory(config: LaunchConfig) -> None:
    """A taken run name, or a local --log-dir that cannot hold folders, fails before Ray or
    the dataset are touched; new_run_storage makes the folder later and checks again."""
    run_storage = RunStorage.from_uri(config.train.log_dir).child(config.name)
    if run_storage.is_local:
        existing = _existing_ancestor(Path(run_storage.root))
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise LaunchError(f"--log-dir: cannot write to {run_storage.uri()}: {existing} is "
                              "not a folder this user can write to; check the path")
    try:
        _refuse_taken_name(run_storage)
    except OSError:
        pass  # a bucket that cannot be read now is reported when the run is made


def _existing_ancestor(path: Path) -> Path:
    """The path itself if it exists, else its nearest existing parent: where folders not made
    yet will be made (on that disk)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _refuse_taken_name(run_storage: RunStorage) -> None:
    if run_storage.exists(RUN_CONFIG_FILE):
        raise LaunchError(f"{run_storage.uri()} already holds a run; pass --resume "
                          f"{run_storage.uri()} to continue it, or another --name")


def new_run_storage(config: LaunchConfig) -> RunStorage:
    """The run's directory under --log-dir, made now; a taken name is an error."""
    run_storage = RunStorage.from_uri(config.train.log_dir).child(config.name)
    try:
        run_storage.makedirs()
    except OSError as error:
        raise LaunchError(f"--log-dir: cannot write to {run_storage.uri()}: {error}; check the "
                          "path or bucket and your credentials") from error
    _refuse_taken_name(run_storage)
    return run_storage


def check_disk_space(config: LaunchConfig, specs: list[TrialSpec]) -> None:
    """Say what the run will write and what is free; refuse, before the run directory is
    made, a run that cannot fit."""
    estimate = estimate_run_bytes({s.name: s.backbone for s in specs}, config.train.epochs,
                                  config.keep_checkpoints)
    log_dir = RunStorage.from_uri(config.train.log_dir)
    if not log_dir.is_local:
        logger.info("this run will write about %s to %s", estimate.describe(), log_dir.uri())
        return
    existing = _existing_ancestor(Path(log_dir.root))
    free = free_bytes(str(existing))
    logger.info("this run will write about %s; %.2f GB is free at %s", estimate.describe(),
                free / 1e9, log_dir.root)
    shortfall = disk_shortfall(estimate, free, config.train.log_dir, config.keep_checkpoints)
    if shortfall and not config.skip_disk_check:
        raise LaunchError(shortfall)
    if shortfall:
        logger.warning("%s", shortfall)


def _write_plan_only(config: LaunchConfig, plan: Plan) -> RunOutcome:
    run_storage = new_run_storage(config)
    run_storage.write_text(PLAN_FILE, dumps_json(plan.to_dict()))
    return RunOutcome(run_dir=run_storage.uri(), run_uri=run_storage.full_uri(),
                      summary={"plan": plan.to_dict()},
                      interrupted=False, dashboard_url=None, plan_only=True)


def _follow_up(config: LaunchConfig) -> tuple[dict[str, dict[str, Any]], str | None]:
    """--init-from's weights per backbone and --mlflow's tracking URI, checked before Ray
    starts (a missing MLflow, a source run without a backbone's best_map_model.pth)."""
    try:
        init_weights = (resolve_init_weights(config.init_from, config.train.backbones)
                        if config.init_from else {})
        if config.mlflow is None:
            return init_weights, None
        run_storage = RunStorage.from_uri(config.train.log_dir).child(config.name)
        mlflow_callback("", "", "")  # imports MLflow: raises FollowUpError when it is missing
        return init_weights, mlflow_tracking_uri(config.mlflow, run_storage.uri(),
                                                 run_storage.is_local)
    except FollowUpError as error:
        raise LaunchError(str(error)) from error


def _mlflow_callbacks(tracking_uri: str | None, run_storage: RunStorage) -> list:
    if tracking_uri is None:
        return []
    try:
        return [mlflow_callback(tracking_uri, MLFLOW_EXPERIMENT, run_storage.uri())]
    except FollowUpError as error:
        raise LaunchError(str(error)) from error


def _scheduler(config: LaunchConfig):
    """ASHA's rungs lie strictly before the last epoch, and it never stops a trial at max_t:
    a stop at the last epoch's report would end the trial before it writes its final files,
    so a trial that trained every epoch would read as stopped. One epoch leaves ASHA nothing
    to compare early, so that run is plain FIFO."""
    if config.scheduler == "asha" and config.train.epochs > 1:
        return ASHAScheduler(metric="map", mode="max", time_attr="training_iteration",
                             max_t=config.train.epochs - 1, grace_period=1,
                             reduction_factor=2, stop_last_trials=False)
    return FIFOScheduler()


def _resume(config: LaunchConfig) -> RunOutcome:
    run_uri = config.resume.rstrip("/")
    if "://" not in run_uri:
        run_uri = str(Path(run_uri).expanduser().resolve())
    run_storage = RunStorage.from_uri(run_uri)
    if not run_storage.exists(RUN_CONFIG_FILE):
        raise LaunchError(f"--resume: {run_uri} holds no {RUN_CONFIG_FILE}; pass the run "
                          "directory itself, e.g. training_logs/run_20251107_120000")
    saved = json.loads(run_storage.read_text(RUN_CONFIG_FILE))
    original = LaunchConfig.from_dict(saved)
    # Where to run may change on resume; what to train may not.
    original.address, original.resume = config.address, run_uri
    original.dashboard, original.dashboard_host = config.dashboard, config.dashboard_host
    original.pending_timeout_s = config.pending_timeout_s
    finished = _finished_summary(run_storage)
    if finished is not None:
        return RunOutcome(run_dir=run_storage.uri(), run_uri=run_storage.full_uri(),
                          summary=finished, interrupted=False,
                          dashboard_url=None, nothing_to_resume=True)
    if not tune.Tuner.can_restore(run_storage.root, storage_filesystem=run_storage.filesystem):
        raise LaunchError(f"--resume: {run_uri} has no Tune experiment state to resume "
                          "(the run stopped before its first trial started); start it again")
    dashboard_url = connect_ray(original)
    tuner = tune.Tuner.restore(run_storage.root, trainable=TRAINABLE, resume_unfinished=True,
                               resume_errored=True, storage_filesystem=run_storage.filesystem)
    control = watch = None
    run_config = restored_run_config(tuner)
    if saved.get("run_control") and run_config is not None:  # None under Ray Client
        control = RunControlCallback(start_run_control(saved["run_control"]),
                                     original.max_failures)
        watch = pending_watch(original, control, run_storage, launchable=None)
        # Tune.restore takes no RunConfig; the restored one holds inert copies of the callbacks
        # that belong to one driver, and the last run's progress lines.
        run_config.callbacks = [c for c in (run_config.callbacks or [])
                                if type(c) is not tune.Callback
                                and not isinstance(c, TrialLinesReporter)] + [
            control, watch, FailureRecorder(run_storage, original.train.to_dict()),
            # MLflow's logger does not survive pickling: a resumed trial gets a new MLflow run.
            *_mlflow_callbacks(saved.get("mlflow_tracking_uri"), run_storage),
            *progress_lines(original, saved.get("data", {}), run_storage)]
        run_config.verbose = tune_verbosity(original.verbose)
    return _fit_and_summarise(tuner, original, run_storage, dashboard_url, control, watch)


def progress_lines(config: LaunchConfig, data: dict[str, Any],
                   run_storage: RunStorage) -> list[TrialLinesReporter]:
    """The console's one line per trial (a Tune callback), unless --verbose 0."""
    if config.verbose < 1:
        return []
    workload = workload_of(config.train, data)
    return [TrialLinesReporter(run_storage, config.train.epochs,
                               math.ceil(workload.train_frames / config.train.batch_size))]


def tune_verbosity(verbose: int) -> int:
    """Tune's own output for --verbose: none at 0 and 1 (our lines say it, where Tune's would
    print each trial's whole config), every result at 2."""
    return 2 if verbose >= 2 else 0


def _finished_summary(run_storage: RunStorage) -> dict[str, Any] | None:
    """The run's final_summary.json when every trial in it completed (else None): resuming
    such a run has nothing to do and must change none of its files."""
    try:
        summary = json.loads(run_storage.read_text(FINAL_SUMMARY_FILE))
    except (OSError, ValueError):
        return None
    results = summary.get("results") or []
    if (summary.get("interrupted") or summary.get("run_error") or not results
            or any(row.get("status") != "completed" for row in results)):
        return None
    return summary


def _fit_and_summarise(tuner: tune.Tuner, config: LaunchConfig, run_storage: RunStorage,
                       dashboard_url: str | None,
                       control: RunControlCallback | None = None,
                       watch: PendingTrialWatch | None = None) -> RunOutcome:
    if dashboard_url:
        logger.info("Ray dashboard: %s (it asks for a token: `ray get-auth-token` prints it "
                    "on this machine; paste it into the page's Authentication Token field; "
                    "for a cluster, `ray dashboard cluster.yaml` forwards it and "
                    "`ray get-auth-token` runs on its head)", dashboard_url)
    logger.info("TensorBoard: tensorboard --logdir %s", run_storage.uri())
    start = time.perf_counter()
    interrupted, run_error = False, None
    try:
        if control is not None:
            with graceful_interrupt(control):
                results = tuner.fit()
        else:
            results = tuner.fit()
    except KeyboardInterrupt:
        interrupted, results = True, None
    except Exception as error:  # Tune itself failed: still summarise what the trials left
        logger.error("the Ray Tune run failed: %s: %s", type(error).__name__, error)
        run_error, results = error, None
    wall_time = time.perf_counter() - start
    try:
        _restore_announced_rows(run_storage, results)
    except Exception:
        logger.exception("could not check the trials' last reported epochs")
    summary = summarise_run(run_storage, config.to_dict(), results, wall_time,
                            interrupted=interrupted, run_error=run_error,
                            terminated=control is not None and control.terminated.is_set(),
                            unplaceable=[t.to_dict() for t in watch.stuck] if watch else None)
    return RunOutcome(run_dir=run_storage.uri(), run_uri=run_storage.full_uri(),
                      summary=summary,
                      interrupted=summary["interrupted"], dashboard_url=dashboard_url)


def _restore_announced_rows(run_storage: RunStorage, results) -> None:
    """A trial stopped right after Tune took its last report (ASHA) may not have written that
    epoch's rows: add them from the checkpoint pointer Tune holds."""
    from crossdet_ray.engine.run_logs import restore_announced_epoch

    for result in results or []:
        name = (result.config or {}).get("trial", {}).get("name")
        if name is None or result.checkpoint is None:
            continue
        try:
            announced = read_checkpoint_pointer(result.checkpoint)
            if restore_announced_epoch(run_storage.child(name), announced):
                logger.info("%s: restored epoch %s's rows from Tune's checkpoint", name,
                            announced["epoch"])
        except (OSError, KeyError, ValueError) as error:
            logger.warning("%s: cannot check its last reported epoch: %s", name, error)
