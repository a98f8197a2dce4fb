"""One model's training steps one by one: wall, user and system time, and page faults.

    python benchmarks/step_by_step.py --backbone mit_b5 --steps 4
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python benchmarks/step_by_step.py --backbone mit_b5 --steps 4

The same batch as cpu_throughput.py, the default (optimised) build and the engine's optimizer.
It shows what a median hides: the first steps fault in fresh memory (system time), later ones
do not. It is for comparing process-wide settings (allocator, threads) run against run.
Prints a table and writes benchmarks/results/step_by_step.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
from tabulate import tabulate

from common import write_results
from cpu_throughput import batch, sgd, train_step
from crossdet_ray.models import build_detector

ENVIRONMENT_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                    "OMP_NUM_THREADS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="mit_b5")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", default="benchmarks/results/step_by_step.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_detector(args.backbone, num_classes=2, min_size=320, max_size=533).train()
    optimizer = sgd(model)
    images, targets = batch()
    steps = []
    for index in range(1, args.steps + 1):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        train_step(model, optimizer, images, targets)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        steps.append({"step": index, "wall_sec": wall, "user_sec": after.ru_utime - before.ru_utime,
                      "system_sec": after.ru_stime - before.ru_stime,
                      "minor_page_faults": after.ru_minflt - before.ru_minflt})
    print(tabulate([(s["step"], f"{s['wall_sec']:.2f}", f"{s['user_sec']:.2f}",
                     f"{s['system_sec']:.2f}", s["minor_page_faults"]) for s in steps],
                   headers=("step", "wall s", "user s", "system s", "minor faults"),
                   tablefmt="github"))
    environment = {key: os.environ[key] for key in ENVIRONMENT_KEYS if key in os.environ}
    write_results(args, environment=environment, steps=steps)


if __name__ == "__main__":
    main()
