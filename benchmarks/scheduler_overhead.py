"""Goal 3: what the scheduler costs around the training itself.

    python benchmarks/scheduler_overhead.py --epochs 2 --min-size 160 --images 32

Runs all five backbones as Ray Tune trials (one local Ray) and reports:
- the run's wall time minus its longest trial's time inside the trainable (Ray start-up,
  trial actors, the driver's summary);
- per epoch, the trial reporter's time (seed CSVs, checkpoint files, tune.report) as a share
  of the epoch.
Prints a table and writes benchmarks/results/scheduler_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from common import add_run_arguments, run_train_config
from crossdet_ray.tune.launcher import LaunchConfig, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser, "benchmarks/results/scheduler_overhead.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        config = LaunchConfig(
            train=run_train_config(args, log_dir=tmp),
            name="overhead", verbose=0, dashboard=False, synthetic_images=args.images)
        start = time.perf_counter()
        outcome = launch(config)
        wall = time.perf_counter() - start
        trials = {}
        for row in outcome.summary["results"]:
            info = json.loads((Path(tmp) / "overhead" / row["trial"] / "logs" /
                               "training_info.json").read_text())
            epochs = info["epoch_times"]
            overhead = info.get("reporting_overhead_sec", [])
            trials[row["trial"]] = {
                "trial_time_sec": info["total_time_sec"], "epoch_times": epochs,
                "reporting_overhead_sec": overhead,
                "reporting_share": [o / e for o, e in zip(overhead, epochs)],
            }
    longest = max(t["trial_time_sec"] for t in trials.values())
    rows = [(name, f"{t['trial_time_sec']:.1f}",
             " ".join(f"{o:.2f}" for o in t["reporting_overhead_sec"]),
             " ".join(f"{100 * s:.2f}%" for s in t["reporting_share"]))
            for name, t in trials.items()]
    print(tabulate(rows, headers=("trial", "time in trainable s", "reporting s per epoch",
                                  "share of epoch"), tablefmt="github"))
    print(f"wall {wall:.1f}s, longest trial {longest:.1f}s, scheduler overhead "
          f"{wall - longest:.1f}s")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "wall_sec": wall,
                                             "longest_trial_sec": longest,
                                             "overhead_sec": wall - longest, "trials": trials},
                                            indent=2))


if __name__ == "__main__":
    main()
