"""Training of one backbone: a plain loop over a data loader, as torchvision's references do.

`fit` is what one Ray Tune trial runs, but it knows nothing about Ray: progress leaves through a
`TrainingListener` (the trial reporter in `crossdet_ray.tune`, or the seed-layout writer when
training without Ray), and a checkpoint dict comes in to resume.
"""

from __future__ import annotations

import itertools
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Protocol

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from crossdet_ray.backbones import get_backbone
from crossdet_ray.config import TrainConfig
from crossdet_ray.data import NpyYoloDataset, collate_detection
from crossdet_ray.engine.checkpoint import (
    CheckpointError,
    build_checkpoint,
    load_checkpoint,
    validate_checkpoint,
)
from crossdet_ray.engine.evaluate import evaluate_coco, measure_inference
from crossdet_ray.engine.parallel import WorkerGroup, single_process
from crossdet_ray.models import build_detector, count_parameters

logger = logging.getLogger(__name__)

LOSS_COMPONENTS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


class TrainingStopped(Exception):
    """The listener asked training to stop (Ctrl-C): nothing is wrong, the run resumes later."""


@dataclass
class BatchMetrics:
    epoch: int
    batch: int
    loss: float
    loss_classifier: float
    loss_box_reg: float
    loss_objectness: float
    loss_rpn_box_reg: float
    timestamp: str
    batch_time_sec: float


@dataclass
class EpochMetrics:
    epoch: int
    avg_loss: float
    total_loss: float
    epoch_time_sec: float
    learning_rate: float
    is_best: bool
    loss_classifier: float
    loss_box_reg: float
    loss_objectness: float
    loss_rpn_box_reg: float
    images_per_sec: float
    map: float | None
    map50: float | None
    map75: float | None
    eval_time_sec: float
    peak_memory_mb: float
    best_epoch: int
    best_loss: float
    timestamp: str
    # The highest test mAP so far and its epoch (0 and None before any evaluation).
    is_best_map: bool = False
    best_map_epoch: int = 0
    best_map: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingSummary:
    """What one backbone's training produced, for training_info.json and the run summary."""

    backbone: str
    num_classes: int
    num_parameters: int
    device: str
    epochs_completed: int
    best_epoch: int
    best_loss: float
    final_loss: float
    map: float | None  # of the best epoch
    map50: float | None
    map75: float | None
    train_images_per_sec: float
    infer_ms_per_image: float
    fps: float
    total_time_sec: float
    history: dict[str, list] = field(default_factory=dict)
    best_map_epoch: int = 0  # the epoch of the highest test mAP (0: never evaluated)
    best_map: float | None = None
    best_map50: float | None = None  # mAP50 and mAP75 of that epoch
    best_map75: float | None = None
    # Epoch seconds (start, end) of the inference timing, so that the summary can say which
    # other trials were running (sharing the device) while it was measured.
    infer_window: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingListener(Protocol):
    """Receives progress; the trial reporter and the plain seed-layout writer implement it."""

    def on_train_start(self, info: dict[str, Any]) -> None: ...

    def on_batch_end(self, metrics: BatchMetrics) -> None: ...

    # Every worker's listener hears each epoch end; `checkpoint` is None on a data-parallel
    # worker other than the main one, whose listener hears no on_train_end either.
    def on_epoch_end(self, metrics: EpochMetrics, checkpoint: dict[str, Any] | None) -> None: ...

    def on_train_end(self, summary: TrainingSummary, checkpoint: dict[str, Any]) -> None: ...

    # Optional: polled before every batch and before evaluation; True stops training with
    # TrainingStopped. It may also raise, e.g. a checkpoint write that failed in the background.
    def should_stop(self) -> bool: ...


def _check_stop(listener, where: str, group: WorkerGroup | None = None) -> None:
    should_stop = getattr(listener, "should_stop", None)
    stop = should_stop is not None and bool(should_stop())
    if group is not None and group.world_size > 1:
        stop = group.any(stop)  # only rank 0 is asked; every worker stops at the same batch
    if stop:
        raise TrainingStopped(f"training stopped {where} on request")


class NullListener:
    def on_train_start(self, info): pass

    def on_batch_end(self, metrics): pass

    def on_epoch_end(self, metrics, checkpoint): pass

    def on_train_end(self, summary, checkpoint): pass


def select_device(requested: str = "auto") -> torch.device:
    """CUDA when visible, else CPU; a CUDA request CUDA cannot honour falls back loudly."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s was requested but CUDA sees no GPU: training on the CPU",
                       requested)
        return torch.device("cpu")
    return device


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _epoch_seed(config: TrainConfig, epoch: int) -> int:
    # Seeding every epoch from (seed, epoch) makes a resumed run draw the same shuffles and
    # drop-path masks as an uninterrupted one, without storing RNG state in checkpoints.
    return config.seed * 1_000_003 + epoch


def seed_epoch_order(loader_generator: torch.Generator, shuffle_generator: torch.Generator,
                     seed: int) -> None:
    """Seed an epoch's loader: its workers' seeds and, separately, its shuffle.

    The order is the one a fresh `DataLoader(shuffle=True, generator=...)` iterator draws from
    a generator seeded with `seed`: such an iterator first takes one int64 from the generator
    (its workers' base seed) and then shuffles. The sampler's own generator skips that draw,
    so each epoch's order is the same as before workers persisted, with any number of workers
    and on resume.
    """
    loader_generator.manual_seed(seed)
    shuffle_generator.manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=shuffle_generator)


def build_datasets(config: TrainConfig, data_dir: str):
    train_set = NpyYoloDataset(data_dir, split="train", test_size=config.test_size,
                               seed=config.split_seed)
    test_set = NpyYoloDataset(data_dir, split="test", test_size=config.test_size,
                              seed=config.split_seed)
    return train_set, test_set


def use_amp(config: TrainConfig, device: torch.device) -> bool:
    if config.amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be auto, bf16 or off, not {config.amp!r}")
    return config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")


def use_activation_checkpointing(config: TrainConfig, backbone: str, device: torch.device) -> bool:
    if config.activation_checkpointing not in ("auto", "on", "off"):
        raise ValueError("activation_checkpointing must be auto, on or off, "
                         f"not {config.activation_checkpointing!r}")
    if config.activation_checkpointing == "auto":
        return device.type == "cuda" and get_backbone(backbone).checkpoint_on_cuda
    return config.activation_checkpointing == "on"


def use_channels_last(config: TrainConfig, device: torch.device) -> bool:
    if config.channels_last not in ("auto", "on", "off"):
        raise ValueError(f"channels_last must be auto, on or off, not {config.channels_last!r}")
    # On this project's CPU it measured no faster (docs/performance.md); cuDNN's bf16
    # convolutions run on tensor cores in NHWC.
    return config.channels_last == "on" or (config.channels_last == "auto"
                                            and device.type == "cuda")


def build_model(config: TrainConfig, backbone: str, num_classes: int,
                device: torch.device | None = None) -> torch.nn.Module:
    device = device or torch.device("cpu")
    torch.manual_seed(config.seed)
    model = build_detector(
        backbone, num_classes=num_classes, pretrained=config.pretrained,
        min_size=config.min_size, max_size=config.max_size,
        activation_checkpointing=use_activation_checkpointing(config, backbone, device))
    if use_channels_last(config, device):
        # Conv weights become NHWC; each conv then returns NHWC maps, which is also how the
        # MiT's token tensors already lie in memory when viewed as maps.
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        if device.type == "cuda":
            compile_encoder(model)
        else:
            # torch 2.14.1's inductor fails on this encoder's dynamic shapes on the CPU
            # (InductorError: cannot determine truth value of Relational), and a static
            # compile measured no faster there (docs/performance.md).
            logger.warning("--compile is ignored on the CPU (%s): it fails on this model's "
                           "dynamic shapes there and measured no faster; training runs eager",
                           backbone)
    return model


def compile_encoder(model: torch.nn.Module, backend: str | Callable = "inductor",
                    dynamic: bool = True) -> None:
    """torch.compile the detector's encoder in place.

    In place (`Module.compile`), not `torch.compile(module)`: the wrapper that returns would add
    `_orig_mod.` to every checkpoint key, and the backbone's call into the encoder would go
    around it. `dynamic` (the default) because frame sizes vary per batch: one compile for all
    sizes instead of one per size.
    """
    model.backbone.encoder.compile(dynamic=dynamic, backend=backend)


def build_optimizer(config: TrainConfig, model: torch.nn.Module, fused: bool = True):
    """The reference's SGD and StepLR. `fused`: the same update in one kernel per tensor
    instead of three passes (mit_b5's step 79 ms instead of 159 ms on the CPU); False keeps
    the plain loop reachable for benchmarks."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_size,
                                                gamma=config.lr_gamma)
    return optimizer, scheduler


def train_one_epoch(model, optimizer, loader, device, epoch: int, listener,
                    amp: bool = False, group: WorkerGroup | None = None) -> dict[str, float]:
    """One pass over the loader; returns the epoch's loss sums and image count.

    With several data-parallel workers (`group`), the losses logged are the mean of the
    workers' losses (the loss whose gradient DDP's averaged step follows) and the images are
    the global batch's; every worker sees the same numbers.
    """
    group = group or single_process()
    model.train()
    sums = dict.fromkeys(("loss",) + LOSS_COMPONENTS, 0.0)
    batches = images_seen = 0
    for batch_index, (images, targets) in enumerate(loader, start=1):
        _check_stop(listener, f"in epoch {epoch}, before batch {batch_index}", group)
        batch_start = time.perf_counter()
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        # One collective for the logged numbers: the workers' mean losses and all images.
        local = [float(loss.detach())] + [float(loss_dict[n].detach()) for n in LOSS_COMPONENTS]
        *totals, batch_images = group.sum(local + [float(len(images))])
        loss_value, *component_values = (total / group.world_size for total in totals)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"the loss became {loss_value} at epoch {epoch}, batch {batch_index}: training "
                "diverged; lower --lr (e.g. --lr 0.001) or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        components = dict(zip(LOSS_COMPONENTS, component_values))
        sums["loss"] += loss_value
        for name, value in components.items():
            sums[name] += value
        batches += 1
        images_seen += int(batch_images)
        listener.on_batch_end(BatchMetrics(
            epoch=epoch, batch=batch_index, loss=loss_value, timestamp=_now(),
            batch_time_sec=time.perf_counter() - batch_start, **components))
    return {**sums, "batches": batches, "images": images_seen}


@dataclass
class Training:
    """What one backbone's training works with, built once by `set_up`."""

    config: TrainConfig
    backbone: str
    device: torch.device
    group: WorkerGroup
    train_set: NpyYoloDataset
    test_set: NpyYoloDataset
    num_classes: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: bool

    def checkpoint(self, epoch: int, loss: float, progress: "Progress") -> dict[str, Any]:
        return build_checkpoint(
            epoch=epoch, backbone=self.backbone, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, loss=loss, best_loss=progress.best_loss,
            best_epoch=progress.best_epoch, config=self.config.to_dict(),
            history=progress.history, num_classes=self.num_classes)


@dataclass
class Progress:
    """How far training has come, over every attempt: each epoch's history and the bests."""

    # elapsed_sec: seconds since the run first started, at each epoch's end, over every attempt.
    history: dict[str, list] = field(default_factory=lambda: {
        "epoch_losses": [], "epoch_times": [], "learning_rates": [], "images_per_sec": [],
        "map": [], "map50": [], "map75": [], "elapsed_sec": []})
    start_epoch: int = 1
    best_loss: float = math.inf
    best_epoch: int = 0
    best_map_epoch: int = 0
    best_map: float | None = None

    @property
    def elapsed_before(self) -> float:
        """Seconds the earlier attempts trained (0 on a fresh start)."""
        return self.history["elapsed_sec"][-1] if self.history["elapsed_sec"] else 0.0


def set_up(config: TrainConfig, backbone: str, data_dir: str, device: torch.device,
           group: WorkerGroup) -> Training:
    """The datasets, the model on `device`, its optimizer and schedule."""
    train_set, test_set = build_datasets(config, data_dir)
    num_classes = max(train_set.num_classes, test_set.num_classes) + 1  # + background
    model = build_model(config, backbone, num_classes, device).to(device)
    optimizer, scheduler = build_optimizer(config, model)
    return Training(config=config, backbone=backbone, device=device, group=group,
                    train_set=train_set, test_set=test_set, num_classes=num_classes,
                    model=model, optimizer=optimizer, scheduler=scheduler,
                    amp=use_amp(config, device))


def resume(training: Training, resume_from: dict[str, Any] | None
           ) -> tuple[Progress, dict[str, Any] | None]:
    """Where training starts: after `resume_from`'s epoch (its weights, optimizer, schedule and
    history), else from `config.init_weights` (weights only: the optimizer and schedule start
    afresh with `config.lr`), else from scratch. Also returns where the weights came from
    (--init-from's file), recorded even on resume, when they are not loaded again."""
    config, backbone = training.config, training.backbone
    progress = Progress()
    init_from = {"path": config.init_weights, "epoch": None} if config.init_weights else None
    if resume_from is None:
        if config.init_weights:
            source = load_initial_weights(training.model, backbone, config.init_weights)
            init_from["epoch"] = source.get("epoch")
        return progress, init_from
    checkpoint = validate_checkpoint(resume_from, "the resume checkpoint")
    if checkpoint["backbone"] != backbone:
        raise ValueError(f"the resume checkpoint is of {checkpoint['backbone']}, not {backbone}")
    training.model.load_state_dict(checkpoint["model_state_dict"])
    training.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    training.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
    progress.start_epoch = int(checkpoint["epoch"]) + 1
    progress.best_loss = float(checkpoint["best_loss"])
    progress.best_epoch = int(checkpoint["best_epoch"])
    progress.history.update({k: list(v) for k, v in checkpoint.get("history", {}).items()})
    progress.best_map_epoch, progress.best_map = best_map_of(progress.history["map"])
    history = progress.history
    if len(history["elapsed_sec"]) != len(history["epoch_losses"]):
        # A checkpoint from before elapsed_sec (or the reference's): its epochs' own times.
        history["elapsed_sec"] = list(itertools.accumulate(history["epoch_times"]))
    logger.info("%s: resuming at epoch %d of %d", backbone, progress.start_epoch, config.epochs)
    return progress, init_from


def build_loaders(training: Training, start_epoch: int
                  ) -> tuple[DataLoader, DataLoader, torch.Generator, torch.Generator]:
    """The training and test loaders, with the generators that seed each epoch's order.

    Loader workers start once and serve every epoch (and every evaluation): restarting them
    at each epoch forked the whole training process again, whose next steps then paid a
    copy-on-write fault for every page they wrote. The shuffle has its own generator, seeded
    per epoch, so the order does not depend on whether workers are restarted.
    """
    config, group, device = training.config, training.group, training.device
    generator, shuffle_generator = torch.Generator(), torch.Generator()
    persistent = config.num_workers > 0
    train_loader = group.prepare_loader(DataLoader(
        training.train_set, batch_size=group.per_worker_batch(config.batch_size),
        sampler=RandomSampler(training.train_set, generator=shuffle_generator),
        num_workers=config.num_workers, collate_fn=collate_detection, generator=generator,
        pin_memory=device.type == "cuda", persistent_workers=persistent))
    test_loader = DataLoader(training.test_set, batch_size=config.batch_size, shuffle=False,
                             num_workers=config.num_workers, collate_fn=collate_detection,
                             persistent_workers=persistent)
    if (persistent and group.is_main and config.evaluate_every_epoch and len(training.test_set)
            and start_epoch <= config.epochs):
        # Fork the test loader's workers now, beside the training loader's, while this
        # process holds little more than the weights: forked at the first evaluation, they
        # would share every page of the step's retained memory (engine/host_memory.py), and
        # the next epoch would pay a copy-on-write fault for each page it writes.
        iter(test_loader)
    return train_loader, test_loader, generator, shuffle_generator


def run_epoch(training: Training, progress: Progress, epoch: int, loaders, listener,
              train_model: torch.nn.Module, clock_start: float) -> EpochMetrics:
    """Train epoch `epoch`, evaluate it (main worker), and record it in `progress`.
    `clock_start`: the perf_counter reading at which the run (every attempt) began."""
    config, device, group = training.config, training.device, training.group
    train_loader, test_loader, generator, shuffle_generator = loaders
    torch.manual_seed(_epoch_seed(config, epoch))
    seed_epoch_order(generator, shuffle_generator, _epoch_seed(config, epoch))
    if isinstance(train_loader.sampler, DistributedSampler):
        # Its shuffle is seeded by (its seed + epoch): a new order each epoch, the same
        # on every worker, and the same again on resume.
        train_loader.sampler.set_epoch(_epoch_seed(config, epoch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    learning_rate = training.optimizer.param_groups[0]["lr"]
    epoch_start = time.perf_counter()
    sums = train_one_epoch(train_model, training.optimizer, train_loader, device, epoch,
                           listener, amp=training.amp, group=group)
    epoch_time = time.perf_counter() - epoch_start
    training.scheduler.step()

    _check_stop(listener, f"after epoch {epoch}'s last batch", group)
    eval_start = time.perf_counter()
    # The main worker evaluates the whole test split; the others go on to the next epoch
    # and wait for it at the first gradient all-reduce.
    metrics = (evaluate_coco(training.model, test_loader, device, training.num_classes)
               if group.is_main and config.evaluate_every_epoch and len(training.test_set)
               else None)
    eval_time = time.perf_counter() - eval_start

    batches = max(sums["batches"], 1)
    avg_loss = sums["loss"] / batches
    is_best = avg_loss < progress.best_loss
    if is_best:
        progress.best_loss, progress.best_epoch = avg_loss, epoch
    # The first epoch reaching the highest mAP; a later tie does not move it.
    is_best_map = metrics is not None and (progress.best_map is None
                                           or metrics.map > progress.best_map)
    if is_best_map:
        progress.best_map, progress.best_map_epoch = metrics.map, epoch
    images_per_sec = sums["images"] / epoch_time if epoch_time > 0 else 0.0
    for key, value in (("epoch_losses", avg_loss), ("epoch_times", epoch_time),
                       ("learning_rates", learning_rate), ("images_per_sec", images_per_sec),
                       ("map", metrics.map if metrics else None),
                       ("map50", metrics.map50 if metrics else None),
                       ("map75", metrics.map75 if metrics else None),
                       ("elapsed_sec", time.perf_counter() - clock_start)):
        progress.history[key].append(value)
    return EpochMetrics(
        epoch=epoch, avg_loss=avg_loss, total_loss=sums["loss"], epoch_time_sec=epoch_time,
        learning_rate=learning_rate, is_best=is_best,
        **{name: sums[name] / batches for name in LOSS_COMPONENTS},
        images_per_sec=images_per_sec,
        map=metrics.map if metrics else None, map50=metrics.map50 if metrics else None,
        map75=metrics.map75 if metrics else None, eval_time_sec=eval_time,
        peak_memory_mb=peak_memory_mb(device), best_epoch=progress.best_epoch,
        best_loss=progress.best_loss, timestamp=_now(), is_best_map=is_best_map,
        best_map_epoch=progress.best_map_epoch, best_map=progress.best_map,
    )


def finish(training: Training, progress: Progress, clock_start: float) -> TrainingSummary:
    """The main worker's summary: the bests, the mean training speed, and the inference time
    measured now on the test split (`clock_start` as for run_epoch)."""
    history = progress.history
    infer_started = time.time()
    timing = measure_inference(training.model, training.test_set, training.device)
    infer_window = (infer_started, time.time())
    epochs_done = len(history["epoch_losses"])

    def index_of(epoch: int) -> int | None:
        return epoch - 1 if 0 < epoch <= epochs_done else None

    def at(key: str, epoch: int):
        index = index_of(epoch)
        return history[key][index] if index is not None else None

    speeds = [v for v in history["images_per_sec"] if v]
    return TrainingSummary(
        backbone=training.backbone, num_classes=training.num_classes,
        num_parameters=count_parameters(training.model), device=str(training.device),
        epochs_completed=epochs_done, best_epoch=progress.best_epoch,
        best_loss=progress.best_loss,
        final_loss=history["epoch_losses"][-1] if epochs_done else math.nan,
        map=at("map", progress.best_epoch), map50=at("map50", progress.best_epoch),
        map75=at("map75", progress.best_epoch),
        train_images_per_sec=sum(speeds) / len(speeds) if speeds else 0.0,
        infer_ms_per_image=timing.infer_ms_per_image, fps=timing.fps,
        total_time_sec=time.perf_counter() - clock_start, history=history,
        best_map_epoch=progress.best_map_epoch, best_map=progress.best_map,
        best_map50=at("map50", progress.best_map_epoch),
        best_map75=at("map75", progress.best_map_epoch), infer_window=infer_window,
    )


def fit(
    config: TrainConfig,
    backbone: str,
    data_dir: str,
    listener: TrainingListener | None = None,
    resume_from: dict[str, Any] | None = None,
    device: torch.device | None = None,
    group: WorkerGroup | None = None,
) -> TrainingSummary:
    """Train `backbone` for `config.epochs` epochs, resuming after `resume_from` when given:
    set up, resume, one epoch at a time, finish.

    `group`: this process is one of several data-parallel workers (see engine/parallel.py).
    Every worker resumes from the same checkpoint and trains on its share of each global
    batch; only the main worker evaluates, and only its `listener` hears a checkpoint and the
    end of training (the others' hear batch and epoch ends: a NullListener, or one that keeps
    step with the main worker's).
    """
    group = group or single_process()
    listener = listener or NullListener()
    device = device or select_device(config.device)
    run_start, run_started_at = time.perf_counter(), time.time()

    training = set_up(config, backbone, data_dir, device, group)
    progress, init_from = resume(training, resume_from)
    # Seconds count over every attempt: this one's clock starts as if the earlier ran in it.
    clock_start = run_start - progress.elapsed_before
    # Wrapped after the resume load: DDP starts every worker from rank 0's weights.
    train_model = group.distribute(training.model)
    num_parameters = count_parameters(training.model)
    listener.on_train_start({
        "backbone": backbone, "num_classes": training.num_classes,
        "num_parameters": num_parameters, "device": str(device), "amp_bf16": training.amp,
        "activation_checkpointing": bool(getattr(getattr(getattr(
            training.model, "backbone", None), "encoder", None), "activation_checkpointing",
            False)),
        "train_images": len(training.train_set), "test_images": len(training.test_set),
        "start_epoch": progress.start_epoch, "started_at": run_started_at,
        "init_from": init_from, "best_map_epoch": progress.best_map_epoch,
    })

    loaders = build_loaders(training, progress.start_epoch)
    checkpoint: dict[str, Any] | None = None
    for epoch in range(progress.start_epoch, config.epochs + 1):
        metrics = run_epoch(training, progress, epoch, loaders, listener, train_model,
                            clock_start)
        if not group.is_main:
            # The other workers hold no checkpoint; their listener may keep step with the
            # main worker's (Ray Train's reports are collective).
            listener.on_epoch_end(metrics, None)
            continue
        checkpoint = training.checkpoint(epoch, metrics.avg_loss, progress)
        logger.info("%s epoch %d/%d: loss %.4f, lr %g, %.1fs, %.2f img/s, mAP %s", backbone,
                    epoch, config.epochs, metrics.avg_loss, metrics.learning_rate,
                    metrics.epoch_time_sec, metrics.images_per_sec,
                    "n/a" if metrics.map is None else f"{metrics.map:.4f}")
        listener.on_epoch_end(metrics, checkpoint)

    if not group.is_main:
        return _worker_summary(backbone, training.num_classes, num_parameters, device,
                               progress.history, progress.best_epoch, progress.best_loss)
    if checkpoint is None:  # resumed after the last epoch: only the final files are missing
        losses = progress.history["epoch_losses"]
        checkpoint = training.checkpoint(progress.start_epoch - 1,
                                         losses[-1] if losses else math.nan, progress)
    summary = finish(training, progress, clock_start)
    listener.on_train_end(summary, checkpoint)
    return summary


def best_map_of(maps: list[float | None]) -> tuple[int, float | None]:
    """(epoch, mAP) of the first epoch with the highest mAP in a history; (0, None) if none."""
    best_epoch, best = 0, None
    for epoch, value in enumerate(maps, start=1):
        if value is not None and (best is None or value > best):
            best_epoch, best = epoch, value
    return best_epoch, best


def load_initial_weights(model: torch.nn.Module, backbone: str, path: str) -> dict[str, Any]:
    """Load another run's weights into `model` (strictly: same backbone, same classes)."""
    checkpoint = load_checkpoint(path)
    source_backbone = checkpoint.get("backbone")
    if source_backbone is not None and source_backbone != backbone:
        raise CheckpointError(f"--init-from: {path} holds {source_backbone}, not {backbone}")
    try:
        model.load_state_dict(checkpoint["model_state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"--init-from: {path} does not fit {backbone} on this dataset "
                              f"(another class count?): {str(error).splitlines()[0]}") from error
    logger.info("%s: starting from the weights of %s (epoch %s)", backbone, path,
                checkpoint.get("epoch"))
    return checkpoint


def _worker_summary(backbone, num_classes, num_parameters, device, history, best_epoch,
                    best_loss) -> TrainingSummary:
    """What a non-main worker knows at the end: the shared losses, no evaluation or timing."""
    losses = history["epoch_losses"]
    return TrainingSummary(
        backbone=backbone, num_classes=num_classes, num_parameters=num_parameters,
        device=str(device), epochs_completed=len(losses), best_epoch=best_epoch,
        best_loss=best_loss, final_loss=losses[-1] if losses else math.nan, map=None,
        map50=None, map75=None, train_images_per_sec=0.0, infer_ms_per_image=math.nan,
        fps=math.nan, total_time_sec=0.0, history=history)
