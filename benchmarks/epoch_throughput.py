"""Whole epochs: our engine against the plain eager baseline, alternating epoch by epoch.

    python benchmarks/epoch_throughput.py [--backbones mit_b0 ... mit_b5] [--images 16]
        [--epochs 2] [--min-size 320] [--num-workers 0]

Per backbone, on the built-in synthetic set (`--images` frames, 80% of them train):
- **engine**: `crossdet_ray.engine.train.fit` as a trial runs it (the trial reporter over the
  seed-layout writer, Tune's report a no-op), writing its real fsynced checkpoints in the
  background, evaluating the test split after every epoch;
- **eager baseline**: the same network with every speed switch off, trained as
  CrossAttentionDet's script trains: torchvision's RoIAlign (`vectorized_roi_align=False`),
  explicit attention (`fused_attention=False`), per-tensor SGD (`foreach=False, fused=False`),
  a fresh DataLoader each epoch, and a synchronous `torch.save` of the epoch checkpoint.
Both start from the same weights and draw the same frame order and random numbers; their
first training step's losses are compared and the result is printed.

They alternate epoch by epoch: the baseline's epoch k runs inside the engine's epoch-end
callback, after the engine's previous checkpoint write has finished (the wait is the
engine's time) and before it hands over epoch k's checkpoint, so neither side's work runs
during the other's epoch. Engine time per epoch = everything from its previous epoch's
hand-over to this epoch's hand-over (snapshot, loader start, steps, waits), minus its
evaluation, which the baseline does not do (shown on its own). images/s = training frames x
epochs / that time.

The baseline runs in a child process (spawned, idle while the engine trains): a trial's
process keeps its freed host memory (engine/host_memory.py, process-wide), which
CrossAttentionDet's script does not, so the two cannot share one process.

For every backbone it also states the arithmetic floor of a steady step: the FLOPs of one
training step (forward + backward) counted by torch.utils.flop_counter.FlopCounterMode,
divided by this CPU's matmul peak measured here with torch.mm (1024 x 12544 x 1024, best of
10), and the ratio of the engine's steady step (median of its steps after the first two) to it.
torch's own count of a convolution's backward charges a grouped (depthwise) convolution's
weight gradient as if it were dense, C times too much for the MixFFN's 3 x 3 depthwise
convolutions (it put mit_b5's step at 4,230 GFLOP instead of about 1,080), so here each
gradient a convolution's backward computes counts as one forward of that convolution; the CPU
attention kernel, which torch does not count, counts as the matmuls it does.
Prints a table (with the load average) and writes benchmarks/results/epoch_throughput.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader

from common import run_train_config, write_results
from crossdet_ray.config import BACKBONES, TrainConfig
from crossdet_ray.data import collate_detection
from crossdet_ray.engine import train as train_module
from crossdet_ray.engine.host_memory import retain_freed_host_memory
from crossdet_ray.engine.run_logs import SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.models import build_detector
from crossdet_ray.data.resolve import ensure_dataset, synthetic_spec
from crossdet_ray.tune.reporter import TrialReporter

# Relative, at step 1. In float32 the RPN's proposal choices can flip with rounding, moving
# the box classifier's loss (tests/models/test_speed_switches.py shows equality in float64).
LOSS_TOLERANCE = 1e-4


class Baseline:
    """CrossAttentionDet's training, one epoch per call."""

    def __init__(self, config: TrainConfig, backbone: str, train_set, num_classes: int,
                 state: dict[str, torch.Tensor], out: str):
        self.config, self.backbone, self.train_set, self.out = config, backbone, train_set, out
        self.model = build_detector(backbone, num_classes=num_classes, min_size=config.min_size,
                                    max_size=config.max_size, fused_attention=False,
                                    vectorized_roi_align=False)
        self.model.load_state_dict(state)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay,
                                         foreach=False, fused=False)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.lr_step_size,
                                                         config.lr_gamma)
        self.step_sec: list[float] = []
        self.first_losses: dict[str, float] | None = None
        self.epoch_sec: list[float] = []

    def epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        seed = train_module._epoch_seed(self.config, epoch)
        torch.manual_seed(seed)  # as the engine: the same drop-path and sampling draws
        loader = DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=True,
                            num_workers=self.config.num_workers, collate_fn=collate_detection,
                            generator=torch.Generator().manual_seed(seed))
        self.model.train()
        losses = []
        for images, targets in loader:
            step_start = time.perf_counter()
            loss_dict = self.model(images, targets)
            loss = sum(loss_dict.values())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            if self.first_losses is None:
                self.first_losses = {"loss": losses[0],
                                     **{k: float(v.detach()) for k, v in loss_dict.items()}}
            self.step_sec.append(time.perf_counter() - step_start)
        self.scheduler.step()
        path = os.path.join(self.out, f"baseline_epoch_{epoch:03d}.pth")
        torch.save({"epoch": epoch, "backbone": self.backbone,
                    "model_state_dict": self.model.state_dict(),
                    "optimizer_state_dict": self.optimizer.state_dict(),
                    "scheduler_state_dict": self.scheduler.state_dict(),
                    "loss": sum(losses) / len(losses)}, path)
        self.epoch_sec.append(time.perf_counter() - start)
        os.remove(path)  # disk space; not timed


def baseline_process(connection, config: dict, backbone: str, data_dir: str, num_classes: int,
                     state_path: str, out: str) -> None:
    """The child process: builds the baseline, says "ready", then trains one epoch per epoch
    number received and answers with its timings, until it receives None."""
    train_config = TrainConfig.from_dict(config)
    train_set, _ = train_module.build_datasets(train_config, data_dir)
    baseline = Baseline(train_config, backbone, train_set, num_classes,
                        torch.load(state_path, weights_only=True), out)
    connection.send("ready")
    while (epoch := connection.recv()) is not None:
        baseline.epoch(epoch)
        connection.send({"epoch_sec": baseline.epoch_sec[-1], "step_sec": baseline.step_sec,
                         "first_losses": baseline.first_losses})


class BaselineInChild:
    """The baseline's epochs, run on request in a spawned process (see the docstring)."""

    def __init__(self, config: TrainConfig, backbone: str, data_dir: str, num_classes: int,
                 state_path: str, out: str):
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        # Not a daemon: the baseline's DataLoader starts worker processes of its own.
        self.process = context.Process(target=baseline_process, args=(
            child_end, config.to_dict(), backbone, data_dir, num_classes, state_path, out))
        self.process.start()
        if self.connection.recv() != "ready":
            raise RuntimeError("the baseline process did not start")
        self.epoch_sec: list[float] = []
        self.step_sec: list[float] = []
        self.first_losses: dict[str, float] | None = None

    def epoch(self, epoch: int) -> None:
        self.connection.send(epoch)
        reply = self.connection.recv()
        self.epoch_sec.append(reply["epoch_sec"])
        self.step_sec, self.first_losses = reply["step_sec"], reply["first_losses"]

    def close(self) -> None:
        try:
            self.connection.send(None)
        except OSError:  # it has died already (its traceback is on stderr)
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.terminate()


class Alternating:
    """The engine's listener: the trial reporter, with the baseline's epochs run in between."""

    def __init__(self, reporter: TrialReporter, writer: SeedLogWriter,
                 baseline: BaselineInChild, epochs: int):
        self.reporter, self.writer, self.baseline, self.epochs = reporter, writer, baseline, epochs
        self.resumed_at: float | None = None  # the engine's clock restarts here
        self.epoch_sec: list[float] = []
        self.step_sec: list[float] = []
        self.first_losses: dict[str, float] | None = None
        self.eval_sec = 0.0

    def on_train_start(self, info):
        self.reporter.on_train_start(info)

    def should_stop(self):
        if self.resumed_at is None:  # epoch 1's first batch is in hand: the clock starts
            self.resumed_at = time.perf_counter()
        return self.reporter.should_stop()

    def on_batch_end(self, metrics):
        if self.first_losses is None:
            self.first_losses = {"loss": metrics.loss, **{
                k: getattr(metrics, k) for k in train_module.LOSS_COMPONENTS}}
        self.step_sec.append(metrics.batch_time_sec)
        self.reporter.on_batch_end(metrics)

    def on_epoch_end(self, metrics, checkpoint):
        # The previous write must be done before the baseline runs; in a real run the
        # hand-over below waits for it just the same, so the wait is the engine's time.
        self.writer._writes.wait()
        paused = time.perf_counter()
        self.baseline.epoch(metrics.epoch)
        engine_sec = paused - self.resumed_at - self.eval_sec
        self.eval_sec = 0.0
        self.resumed_at = time.perf_counter()
        self.reporter.on_epoch_end(metrics, checkpoint)
        if metrics.epoch == self.epochs:  # the last file is part of the last epoch
            self.writer._writes.wait()
            engine_sec += time.perf_counter() - self.resumed_at
        self.epoch_sec.append(engine_sec)

    def on_train_end(self, summary, checkpoint):
        self.reporter.on_train_end(summary, checkpoint)


def cpu_times() -> list[int]:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (jiffies)."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:9]]


def steal_percent(before: list[int], after: list[int]) -> float:
    """Share of the machine's CPU time its host gave to others (a shared VM's noise)."""
    spent = [b - a for a, b in zip(before, after)]
    return 100.0 * spent[7] / max(sum(spent), 1)


def matmul_peak_gflops(repeats: int = 10) -> float:
    a, b = torch.randn(1024, 12544), torch.randn(12544, 1024)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 * 12544 * 1024 / best / 1e9


def convolution_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding,
                              _dilation, transposed, _output_padding, _groups, output_mask,
                              out_shape=None, **kwargs) -> int:
    """Each gradient computed (input, weight) costs one forward of the convolution; w_shape
    already has in_channels / groups, so grouped convolutions come out right."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def cpu_attention_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def step_gflop(config: TrainConfig, backbone: str, num_classes: int, train_set) -> float:
    """FLOPs of one training step of the engine's model (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    model = train_module.build_model(config, backbone, num_classes).train()
    images, targets = collate_detection([train_set[i] for i in range(config.batch_size)])
    counter = FlopCounterMode(display=False, custom_mapping={
        aten.convolution_backward: convolution_backward_flop,
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flop})
    with counter:
        sum(model(list(images), list(targets)).values()).backward()
    return counter.get_total_flops() / 1e9


def run_backbone(backbone: str, config: TrainConfig, data_dir: str, peak: float | None
                 ) -> dict[str, Any]:
    train_set, test_set = train_module.build_datasets(config, data_dir)
    num_classes = max(train_set.num_classes, test_set.num_classes) + 1
    state = train_module.build_model(config, backbone, num_classes).state_dict()
    evals: list[float] = []
    original_evaluate = train_module.evaluate_coco

    def timed_evaluate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_evaluate(*args, **kwargs)
        finally:
            evals.append(time.perf_counter() - start)
            listener.eval_sec = evals[-1]

    with tempfile.TemporaryDirectory() as out:
        state_path = os.path.join(out, "initial_weights.pth")
        torch.save(state, state_path)
        del state
        baseline = BaselineInChild(config, backbone, data_dir, num_classes, state_path, out)
        load_before, times_before = os.getloadavg(), cpu_times()
        writer = SeedLogWriter(RunStorage.from_uri(os.path.join(out, backbone)), backbone,
                               config.to_dict())
        reporter = TrialReporter(writer, announce=lambda metrics, pointer: None)
        listener = Alternating(reporter, writer, baseline, config.epochs)
        train_module.evaluate_coco = timed_evaluate
        try:
            train_module.fit(config, backbone, data_dir, listener=listener)
        finally:
            train_module.evaluate_coco = original_evaluate
            baseline.close()
        load_after, times_after = os.getloadavg(), cpu_times()

    frames = len(train_set) * config.epochs
    engine_sec, baseline_sec = sum(listener.epoch_sec), sum(baseline.epoch_sec)
    differences = {k: abs(listener.first_losses[k] - baseline.first_losses[k])
                   / max(abs(baseline.first_losses[k]), 1e-12) for k in listener.first_losses}
    steady = statistics.median(listener.step_sec[2:] or listener.step_sec)
    result = {
        "train_frames": len(train_set), "epochs": config.epochs,
        "engine_epoch_sec": listener.epoch_sec, "baseline_epoch_sec": baseline.epoch_sec,
        "engine_images_per_sec": frames / engine_sec,
        "baseline_images_per_sec": frames / baseline_sec,
        "ratio": baseline_sec / engine_sec,
        "engine_eval_sec": evals,
        "engine_images_per_sec_with_eval": frames / (engine_sec + sum(evals)),
        "engine_step_sec": listener.step_sec, "baseline_step_sec": baseline.step_sec,
        "engine_steady_step_sec": steady,
        "baseline_steady_step_sec": statistics.median(baseline.step_sec[2:]
                                                      or baseline.step_sec),
        "step1_losses": {"engine": listener.first_losses, "baseline": baseline.first_losses},
        "step1_rel_diff": differences,
        "step1_max_rel_diff": max(differences.values()),
        "step1_equal": max(differences.values()) <= LOSS_TOLERANCE,
        "load_average": {"before": load_before, "after": load_after},
        "steal_percent": steal_percent(times_before, times_after),
    }
    if peak is not None:
        gflop = step_gflop(config, backbone, num_classes, train_set)
        result.update({"step_gflop": gflop, "matmul_peak_gflops": peak,
                       "floor_step_sec": gflop / peak,
                       "steady_over_floor": steady / (gflop / peak)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--images", type=int, default=16,
                        help="synthetic frames; 80%% train (16: 12 training frames, 6 steps)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each side")
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the FLOP count and the matmul peak (a quick smoke run)")
    parser.add_argument("--output", default="benchmarks/results/epoch_throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data_dir = ensure_dataset(synthetic_spec(args.images, 0))
    config = run_train_config(args, data=data_dir, num_workers=args.num_workers)
    # The engine's process is a trial's process in this respect (the baseline's child is not).
    retain_freed_host_memory()
    peak = None if args.no_floor else matmul_peak_gflops()
    results, rows = {}, []
    for backbone in args.backbones:
        result = results[backbone] = run_backbone(backbone, config, data_dir, peak)
        floor = (f"{result['floor_step_sec']:.2f} s ({result['steady_over_floor']:.2f}x)"
                 if "floor_step_sec" in result else "-")
        rows.append((backbone, f"{result['baseline_images_per_sec']:.3f}",
                     f"{result['engine_images_per_sec']:.3f}", f"{result['ratio']:.2f}x",
                     f"{result['baseline_steady_step_sec']:.2f} / "
                     f"{result['engine_steady_step_sec']:.2f}",
                     f"{sum(result['engine_eval_sec']):.1f}", floor,
                     f"{'equal' if result['step1_equal'] else 'DIFFERENT'} "
                     f"({result['step1_max_rel_diff']:.1e})",
                     f"{result['load_average']['before'][0]:.1f}-"
                     f"{result['load_average']['after'][0]:.1f}",
                     f"{result['steal_percent']:.0f}%"))
        print(f"{backbone}: step-1 losses engine {result['step1_losses']['engine']['loss']:.6f}, "
              f"baseline {result['step1_losses']['baseline']['loss']:.6f}: "
              f"{'equal' if result['step1_equal'] else 'NOT equal'} within {LOSS_TOLERANCE:g} "
              f"relative (max {result['step1_max_rel_diff']:.1e} over the loss and its four parts: "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["step1_rel_diff"].items())
              + "; the box classifier's moves with the RPN's top-k/NMS choices, see "
              "tests/models/test_speed_switches.py)", flush=True)
    print(tabulate(rows, headers=(
        "backbone", "eager baseline img/s", "engine img/s", "ratio",
        "steady step s (baseline / engine)", "engine eval s (not in img/s)",
        "floor step (engine steady / floor)", "step-1 losses", "load avg",
        "CPU stolen by the host"), tablefmt="github"))
    if peak is not None:
        print(f"matmul peak {peak:.0f} GFLOP/s (torch.mm 1024 x 12544 x 1024, best of 10); "
              f"{torch.get_num_threads()} torch threads")
    write_results(args, matmul_peak_gflops=peak, results=results)


if __name__ == "__main__":
    main()
