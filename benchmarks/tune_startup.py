"""Goal 3's fixed costs alone: Ray's start-up, Tune starting N empty trials, one actor's imports.

    python benchmarks/tune_startup.py --trials 5 [--import-trainable]

What the scheduler-overhead figure is made of, without any training: `ray.init` on a fresh
local Ray; the time from `Tuner.fit()` until each of N trainables that only report has
started (Tune's set-up plus N worker processes importing Ray and Tune; with
`--import-trainable`, until each has also imported the training stack, as a real trial
does); and, in a fresh interpreter, the time to import the trainable's module (torch,
torchvision, Ray Tune), which every trial actor pays once. Prints a table and writes
benchmarks/results/tune_startup.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate


def empty_trainable(config):
    from ray import tune

    if config["import_trainable"]:
        importlib.import_module("crossdet_ray.tune.trainable")
    tune.report({"entered_at": time.time()})


def import_seconds() -> float:
    code = ("import time; t = time.perf_counter(); import crossdet_ray.tune.trainable; "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--import-trainable", action="store_true",
                        help="each trial imports the training stack, as real trials do")
    parser.add_argument("--output", default="benchmarks/results/tune_startup.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    imports = import_seconds()
    start = time.perf_counter()
    import ray
    from ray import tune

    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    ray_init = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        fit_started_at = time.time()
        results = tune.Tuner(
            tune.with_resources(empty_trainable, {"cpu": 0.1}),
            param_space={"trial": tune.grid_search(list(range(args.trials))),
                         "import_trainable": args.import_trainable},
            run_config=tune.RunConfig(storage_path=tmp, verbose=0)).fit()
        entered = sorted(r.metrics["entered_at"] - fit_started_at for r in results)
    ray.shutdown()
    rows = [("import crossdet_ray.tune.trainable (fresh interpreter)", f"{imports:.2f}"),
            ("import ray + ray.init (local, no dashboard)", f"{ray_init:.2f}"),
            (f"Tuner.fit() until {args.trials} trainables started"
             + (" and imported the training stack" if args.import_trainable else ""),
             f"{entered[0]:.2f} - {entered[-1]:.2f}")]
    print(tabulate(rows, headers=("what", "s"), tablefmt="github"))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({
        "args": vars(args), "import_trainable_sec": imports, "ray_init_sec": ray_init,
        "empty_trials_entered_after_sec": entered}, indent=2))


if __name__ == "__main__":
    main()
