"""Data-parallel efficiency on the CPU: 2 Ray Train workers x 1 torch thread vs 1 process x 2.

    python benchmarks/ddp_scaling.py --backbone mit_b0 --batch-size 2 --steps 3

The same global batch of 5 x 240 x 320 frames (min_size 320, FACTS.md's CPU setting) and the
same optimizer step: one process with two torch threads takes the whole batch; two Ray Train
workers (gloo, one thread each, DDP from `ray_worker_group`, as a `--workers-per-trial 2` trial
trains) take half each. The single process is timed before and after the workers (A B A), so
drift in the machine's speed shows. Each figure is global images / step time after warm-up
steps, from the median step and from the fastest: on a machine other work shares, the fastest
step is the one least slowed by it. Efficiency = 2-worker images/s / 1-process images/s (the
1-process runs' better figure): 1.0 is perfect scaling of the same two cores; what is lost is
the gradient and BatchNorm all-reduces and the workers' own overheads. A last run times one
worker's share alone (half the batch, one thread, no DDP): the ceiling of the 2-worker figure.
Prints a table and writes benchmarks/results/ddp_scaling.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
from tabulate import tabulate

from common import write_results
from cpu_throughput import WARM_UP_STEPS, batch, sgd, train_step
from crossdet_ray.config import BACKBONES

BENCHMARKS = Path(__file__).resolve().parent
MIN_SIZE, MAX_SIZE = 320, 533


def _model(backbone: str) -> torch.nn.Module:
    from crossdet_ray.models import build_detector

    torch.manual_seed(0)
    return build_detector(backbone, num_classes=2, min_size=MIN_SIZE, max_size=MAX_SIZE).train()


def timed_steps(model, group, images, targets, steps: int) -> list[float]:
    """Seconds of each training step after the warm-up ones, on this worker's images."""
    model = group.distribute(model)
    optimizer = sgd(model)
    times = []
    for index in range(WARM_UP_STEPS + steps):
        start = time.perf_counter()
        train_step(model, optimizer, images, targets)
        if index >= WARM_UP_STEPS:
            times.append(time.perf_counter() - start)
    return times


def one_process(backbone: str, global_batch: int, steps: int, threads: int) -> list[float]:
    from crossdet_ray.engine.parallel import single_process

    torch.set_num_threads(threads)
    images, targets = batch(count=global_batch)
    return timed_steps(_model(backbone), single_process(), images, targets, steps)


def _worker(config: dict) -> None:
    import ray.train

    from crossdet_ray.tune.data_parallel import ray_worker_group

    torch.set_num_threads(1)
    group = ray_worker_group(torch.device("cpu"))
    share = group.per_worker_batch(config["global_batch"])
    images, targets = batch(count=config["global_batch"])
    mine = slice(group.rank * share, (group.rank + 1) * share)
    times = timed_steps(_model(config["backbone"]), group, images[mine], targets[mine],
                        config["steps"])
    if group.is_main:
        # Every step ends in the same all-reduce, so rank 0's step times are the group's.
        torch.save(times, config["out"])
    ray.train.report({})


def two_workers(backbone: str, global_batch: int, steps: int, out: Path) -> list[float]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # The workers import this script's helpers (cpu_throughput, common) by name.
    path = os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        TorchTrainer(
            _worker, train_loop_config={"backbone": backbone, "global_batch": global_batch,
                                        "steps": steps, "out": str(out)},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(storage_path=str(out.parent / "ray_train"),
                                           name="ddp_scaling"),
        ).fit()
    finally:
        ray.shutdown()
    return torch.load(out)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", choices=BACKBONES, default="mit_b0")
    parser.add_argument("--batch-size", type=int, default=2, help="the global batch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--output", default="benchmarks/results/ddp_scaling.json")
    args = parser.parse_args()
    if args.batch_size % 2:
        parser.error("--batch-size must be even: each of the 2 workers takes half")

    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        before = one_process(args.backbone, args.batch_size, args.steps, threads=2)
        workers = two_workers(args.backbone, args.batch_size, args.steps,
                              Path(scratch) / "steps.pt")
        after = one_process(args.backbone, args.batch_size, args.steps, threads=2)
        # What one worker computes, without the other or any all-reduce: the 2-worker
        # figure's ceiling (as if two of these ran side by side for free).
        half = one_process(args.backbone, args.batch_size // 2, args.steps, threads=1)

    runs = (("1 process x 2 threads (before)", before), ("2 workers x 1 thread", workers),
            ("1 process x 2 threads (after)", after),
            ("1 worker's share alone (1 thread, batch / 2, no DDP)", half))
    rates = {statistic: {name: args.batch_size / pick(times) for name, times in runs}
             for statistic, pick in (("median", median), ("fastest", min))}
    efficiency = {statistic: rate["2 workers x 1 thread"] / max(rate[runs[0][0]], rate[runs[2][0]])
                  for statistic, rate in rates.items()}
    print(tabulate([(name, f"{rates['median'][name]:.3f}", f"{rates['fastest'][name]:.3f}")
                    for name, _ in runs],
                   headers=(f"{args.backbone}, global batch {args.batch_size}",
                            "images/s (median step)", "images/s (fastest step)"),
                   tablefmt="github"))
    print("efficiency (2 workers / the better 1-process run): "
          f"{efficiency['median']:.2f} (median steps), {efficiency['fastest']:.2f} (fastest)")
    write_results(args, images_per_sec=rates, step_seconds={
        "one_process_before": before, "two_workers": workers, "one_process_after": after,
        "half_batch_one_thread": half},
        efficiency=efficiency, cpu_count=os.cpu_count(), load_average=os.getloadavg())


if __name__ == "__main__":
    main()
