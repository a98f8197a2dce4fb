"""Goal 3: what the scheduler costs around the training itself.

    python benchmarks/scheduler_overhead.py --epochs 2 --min-size 160 --images 32

Runs all five backbones as Ray Tune trials (one local Ray) and reports:
- the run's wall time minus its longest trial's training time (`fit`'s total_time_sec:
  data, model build, epochs, evaluation), split into where the rest went: before that trial's
  fit started (Ray start-up, preflight, trial actor start-up), and after it ended (final
  checkpoint files, Tune's wrap-up, the driver's summary);
- per epoch, the trial reporter's time in the training thread (seed CSVs, the checkpoint
  snapshot handed to the background writer, tune.report) as a share of the epoch.
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
        started_at, start = time.time(), time.perf_counter()
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
                "trainable_entered_after_sec": info["trainable_started_at"] - started_at,
                "fit_started_after_sec": info["fit_started_at"] - started_at,
                "fit_ended_after_sec": info["fit_started_at"] + info["total_time_sec"]
                - started_at,
                "files_done_after_sec": info["train_finished_at"] - started_at,
            }
    longest_name, longest = max(trials.items(), key=lambda item: item[1]["trial_time_sec"])
    breakdown = {
        "before the longest trial's fit (Ray, preflight, actor start)":
            longest["fit_started_after_sec"],
        "  of which: until its trainable was entered": longest["trainable_entered_after_sec"],
        "after its fit (final files)":
            longest["files_done_after_sec"] - longest["fit_ended_after_sec"],
        "after its files (Tune wrap-up, summary)": wall - longest["files_done_after_sec"],
    }
    rows = [(name, f"{t['trial_time_sec']:.1f}", f"{t['fit_started_after_sec']:.1f}",
             " ".join(f"{o:.2f}" for o in t["reporting_overhead_sec"]),
             " ".join(f"{100 * s:.2f}%" for s in t["reporting_share"]))
            for name, t in trials.items()]
    print(tabulate(rows, headers=("trial", "training time s", "fit started at s",
                                  "reporting s per epoch", "share of epoch"), tablefmt="github"))
    print(tabulate([(k, f"{v:.1f}") for k, v in breakdown.items()],
                   headers=("overhead around the longest trial", "s"), tablefmt="github"))
    print(f"wall {wall:.1f}s, longest trial ({longest_name}) {longest['trial_time_sec']:.1f}s, "
          f"scheduler overhead {wall - longest['trial_time_sec']:.1f}s")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({
        "args": vars(args), "wall_sec": wall, "longest_trial": longest_name,
        "longest_trial_sec": longest["trial_time_sec"],
        "overhead_sec": wall - longest["trial_time_sec"], "breakdown_sec": breakdown,
        "trials": trials}, indent=2))


if __name__ == "__main__":
    main()
