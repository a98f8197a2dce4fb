"""Page faults and system time per training step, with freed host memory kept or released.

    python benchmarks/host_memory.py [--backbone mit_b2] [--steps 8] [--pairs 3]

Runs `--pairs` pairs of fresh processes, alternating: glibc's default malloc ("release") and
`retain_freed_host_memory()` ("retain", what a trial's process does). Each trains `--steps`
steps of the engine's model on cpu_throughput.py's batch (2 frames of 5 x 240 x 320,
min_size 320) and reports, per step, wall seconds, system CPU seconds and minor page faults
(`getrusage`). The first two steps fault in fresh memory either way; the steady figures are
the medians of the later steps. Prints a table and writes benchmarks/results/host_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from tabulate import tabulate

from common import write_results

WARM_UP_STEPS = 2


def child(backbone: str, steps: int, mode: str) -> None:
    import torch

    from cpu_throughput import batch, sgd, train_step
    from crossdet_ray.engine.host_memory import retain_freed_host_memory
    from crossdet_ray.models import build_detector

    if mode == "retain":
        retain_freed_host_memory()
    torch.manual_seed(0)
    model = build_detector(backbone, num_classes=2, min_size=320, max_size=533).train()
    optimizer = sgd(model)
    images, targets = batch()
    rows = []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        train_step(model, optimizer, images, targets)
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall_sec": time.perf_counter() - start,
                     "system_sec": after.ru_stime - before.ru_stime,
                     "minor_faults": after.ru_minflt - before.ru_minflt})
    print(json.dumps({"steps": rows, "max_rss_gb": after.ru_maxrss / 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="mit_b2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--child", choices=("release", "retain"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default="benchmarks/results/host_memory.json")
    args = parser.parse_args()
    if args.child:
        child(args.backbone, args.steps, args.child)
        return
    runs: dict[str, list] = {"release": [], "retain": []}
    for _ in range(args.pairs):
        for mode in runs:
            result = subprocess.run([sys.executable, __file__, "--child", mode, "--backbone",
                                     args.backbone, "--steps", str(args.steps)],
                                    capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(result.stdout.strip().splitlines()[-1]))
    rows = []
    for mode, results in runs.items():
        steady = [step for run in results for step in run["steps"][WARM_UP_STEPS:]]
        first = [step for run in results for step in run["steps"][:WARM_UP_STEPS]]
        rows.append((mode, f"{statistics.median(s['wall_sec'] for s in steady):.2f}",
                     f"{statistics.median(s['system_sec'] for s in steady):.2f}",
                     f"{statistics.median(s['minor_faults'] for s in steady):.0f}",
                     f"{statistics.median(s['wall_sec'] for s in first):.2f}",
                     f"{statistics.median(s['system_sec'] for s in first):.2f}",
                     f"{max(r['max_rss_gb'] for r in results):.2f}"))
    print(tabulate(rows, headers=("host memory", "steady step s", "steady system s",
                                  "steady faults", "first 2 steps s", "first 2 system s",
                                  "peak RSS GB"), tablefmt="github"))
    print(f"{args.backbone}, {args.pairs} process pairs x {args.steps} steps; medians")
    write_results(args, runs=runs)


if __name__ == "__main__":
    main()
