"""Wall time of all backbones as Ray Tune trials at once vs one after another in one process.

    python benchmarks/parallel_vs_sequential.py --epochs 2 --min-size 160 --images 32

Prints a table and writes benchmarks/results/parallel_vs_sequential.json. Also measures Ray's
fixed start-up cost: `ray.init` plus the first trivial task.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from common import add_run_arguments, run_train_config
from crossdet_ray.config import TrainConfig
from crossdet_ray.engine.run_logs import SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import fit
from crossdet_ray.data.resolve import ensure_dataset, synthetic_spec


def ray_startup_cost() -> float:
    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    ray.get(ray.remote(lambda: 1).remote())
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return elapsed


def sequential(config: TrainConfig, data_dir: str, out: Path) -> dict[str, float]:
    times = {}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for backbone in config.backbones:
        start = time.perf_counter()
        writer = SeedLogWriter(RunStorage.from_uri(str(out / backbone)), backbone,
                               config.to_dict())
        fit(config, backbone, data_dir, listener=writer)
        times[backbone] = time.perf_counter() - start
    return times


def parallel(config: TrainConfig, out: Path, images: int) -> tuple[float, dict]:
    from crossdet_ray.tune.launcher import LaunchConfig, launch

    launch_config = LaunchConfig(train=config.replace(log_dir=str(out)), name="parallel",
                                 verbose=0, dashboard=False, synthetic_images=images)
    start = time.perf_counter()
    outcome = launch(launch_config)
    return time.perf_counter() - start, outcome.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser, "benchmarks/results/parallel_vs_sequential.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data_dir = ensure_dataset(synthetic_spec(args.images, 0))
    config = run_train_config(args, data=data_dir)
    startup = ray_startup_cost()
    with tempfile.TemporaryDirectory() as tmp:
        seq_start = time.perf_counter()
        per_backbone = sequential(config, data_dir, Path(tmp) / "sequential")
        seq_total = time.perf_counter() - seq_start
        par_total, summary = parallel(config, Path(tmp), args.images)

    rows = [(b, f"{t:.1f}") for b, t in per_backbone.items()]
    rows += [("sequential total", f"{seq_total:.1f}"), ("Ray Tune, all at once", f"{par_total:.1f}"),
             ("speed-up", f"{seq_total / par_total:.2f}x"), ("Ray start-up", f"{startup:.1f}")]
    print(tabulate(rows, headers=("what", "seconds"), tablefmt="github"))
    result = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "args": vars(args), "sequential_per_backbone_sec": per_backbone,
        "sequential_total_sec": seq_total, "parallel_total_sec": par_total,
        "speedup": seq_total / par_total, "ray_startup_sec": startup,
        "parallel_trials": [{k: r[k] for k in ("trial", "status", "total_time_sec", "resources")}
                            for r in summary["results"]],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
