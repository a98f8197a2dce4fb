"""What runs between the last training step of epoch k and the first of epoch k+1, per backbone.

    python benchmarks/epoch_boundary.py --backbones mit_b0 mit_b5 --images 20 --epochs 2 \\
        [--num-workers 4]

One process; each backbone trains with the engine's `fit` and the trial's own listener (the
trial reporter over the seed-layout writer, with Tune's report replaced by a no-op), writing
real, fsynced checkpoints to a temporary directory. The gap between epochs is cut into its
phases with `time.perf_counter`:
- `scheduler + stop check`: from the last step's end until evaluation starts;
- `evaluation`: the test split through pycocotools (the engine's `evaluate_coco`);
- `checkpoint dict`: `build_checkpoint` (state dicts, history);
- `epoch end (reporter)`: the listener's `on_epoch_end`: snapshot of the checkpoint, rows,
  hand-over to the background writer;
- `loader start`: from there until the next epoch's first batch is in hand (worker start-up);
and the writer's competition for the cores shows in the next epoch's steps: `excess steps`
is the sum over the next epoch's steps that ran while the checkpoint was being written of
(step time - the steady step), the steady step being the median of epoch 1's steps after the
first two. `boundary cost` = gap + excess steps, in seconds and in steady steps.
`--host-memory retain` (the default) keeps freed host memory in the process as a trial's
process does (engine/host_memory.py); `release` is glibc's default. Code on `PYTHONPATH` that
predates engine/host_memory.py runs with `release`, and the table says so.
Prints a table and writes benchmarks/results/epoch_boundary.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Any

from tabulate import tabulate

from common import run_train_config, write_results
from crossdet_ray.config import TrainConfig
from crossdet_ray.engine import train as train_module
from crossdet_ray.engine.run_logs import SeedLogWriter
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.data.resolve import ensure_dataset, synthetic_spec
from crossdet_ray.tune.reporter import TrialReporter

PHASES = ("scheduler + stop check", "evaluation", "checkpoint dict", "epoch end (reporter)",
          "loader start")


class Timeline:
    """Timestamps of the training loop's events, gathered through the listener and patches."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, Any]] = []

    def mark(self, name: str, value: Any = None) -> None:
        self.events.append((name, time.perf_counter(), value))


class TimedListener:
    """Passes everything to the trial reporter, marking when each call starts and ends."""

    def __init__(self, inner: TrialReporter, timeline: Timeline):
        self.inner, self.timeline = inner, timeline

    def on_train_start(self, info):
        self.inner.on_train_start(info)

    def should_stop(self):
        self.timeline.mark("should_stop")
        return self.inner.should_stop()

    def on_batch_end(self, metrics):
        self.timeline.mark("batch_end", (metrics.epoch, metrics.batch, metrics.batch_time_sec))
        self.inner.on_batch_end(metrics)

    def on_epoch_end(self, metrics, checkpoint):
        self.timeline.mark("epoch_end_start", metrics.epoch)
        self.inner.on_epoch_end(metrics, checkpoint)
        self.timeline.mark("epoch_end_done", metrics.epoch)

    def on_train_end(self, summary, checkpoint):
        self.inner.on_train_end(summary, checkpoint)


@contextmanager
def patched(module, name: str, timeline: Timeline, label: str):
    """Mark the start and end of every call of `module.name`."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        timeline.mark(f"{label}_start")
        try:
            return original(*args, **kwargs)
        finally:
            timeline.mark(f"{label}_done")

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, original)


def analyse(timeline: Timeline, writes: list[tuple[float, float]]) -> dict[str, Any]:
    events = timeline.events
    batches = [(t, v) for name, t, v in events if name == "batch_end"]
    epochs = sorted({v[0] for _, v in batches})
    first = [v[2] for _, v in batches if v[0] == epochs[0]]
    steady = statistics.median(first[2:] if len(first) > 2 else first)
    boundaries = []
    for epoch in epochs[:-1]:
        last_end = max(t for t, v in batches if v[0] == epoch)

        def after(name, since=last_end):
            return min(t for n, t, _ in events if n == name and t >= since)

        eval_start = after("eval_start")
        eval_done = after("eval_done")
        ckpt_start, ckpt_done = after("checkpoint_start"), after("checkpoint_done")
        end_start, end_done = after("epoch_end_start"), after("epoch_end_done")
        next_first = after("should_stop", end_done)  # polled as the first batch is in hand
        phases = {"scheduler + stop check": eval_start - last_end,
                  "evaluation": eval_done - eval_start, "checkpoint dict": ckpt_done - ckpt_start,
                  "epoch end (reporter)": end_done - end_start,
                  "loader start": next_first - end_done}
        gap = next_first - last_end
        write = next(((s, e) for s, e in writes if s >= last_end), None)
        next_steps = [(t, v) for t, v in batches if v[0] == epoch + 1]
        excess, overlapped = 0.0, 0
        for end_time, (_, _, seconds) in next_steps:
            if write is not None and end_time - seconds < write[1]:  # started before it ended
                excess += seconds - steady
                overlapped += 1
        boundaries.append({
            "after_epoch": epoch, "phases_sec": phases, "gap_sec": gap,
            "write_sec": None if write is None else write[1] - write[0],
            "write_ended_after_next_epoch_start_sec": None if write is None
            else write[1] - next_first,
            "steps_during_write": overlapped, "excess_step_sec": excess,
            "next_epoch_step_sec": [v[2] for _, v in next_steps],
            "boundary_cost_sec": gap + excess, "boundary_cost_steps": (gap + excess) / steady})
    return {"steady_step_sec": steady, "epoch1_step_sec": first, "boundaries": boundaries}


def run_backbone(backbone: str, config: TrainConfig, data_dir: str, out: str) -> dict[str, Any]:
    timeline = Timeline()
    storage = RunStorage.from_uri(os.path.join(out, backbone))
    writer = SeedLogWriter(storage, backbone, config.to_dict())
    writes: list[tuple[float, float]] = []
    commit = writer._commit_epoch

    def timed_commit(*args, **kwargs):
        start = time.perf_counter()
        try:
            return commit(*args, **kwargs)
        finally:
            writes.append((start, time.perf_counter()))

    writer._commit_epoch = timed_commit
    listener = TimedListener(TrialReporter(writer, announce=lambda metrics, pointer: None),
                             timeline)
    with patched(train_module, "evaluate_coco", timeline, "eval"), \
            patched(train_module, "build_checkpoint", timeline, "checkpoint"):
        train_module.fit(config, backbone, data_dir, listener=listener)
    writer.wait_for_checkpoints()
    return analyse(timeline, writes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=["mit_b0", "mit_b5"])
    parser.add_argument("--images", type=int, default=20,
                        help="synthetic frames (80%% train: 20 gives 16, 8 steps of 2)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--host-memory", choices=("retain", "release"), default="retain")
    parser.add_argument("--output", default="benchmarks/results/epoch_boundary.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    host_memory = "release"
    if args.host_memory == "retain":
        try:
            from crossdet_ray.engine.host_memory import retain_freed_host_memory
        except ImportError:  # code from before it existed
            pass
        else:
            host_memory = "retain" if retain_freed_host_memory() else "release"

    data_dir = ensure_dataset(synthetic_spec(args.images, 0))
    config = run_train_config(args, data=data_dir, num_workers=args.num_workers)
    load_before = os.getloadavg()
    results, rows = {}, []
    for backbone in args.backbones:
        with tempfile.TemporaryDirectory() as out:
            result = run_backbone(backbone, config, data_dir, out)
        results[backbone] = result
        for b in result["boundaries"]:
            rows.append((backbone, f"{b['after_epoch']}->{b['after_epoch'] + 1}",
                         f"{result['steady_step_sec']:.2f}",
                         *(f"{b['phases_sec'][p]:.2f}" for p in PHASES),
                         f"{b['gap_sec']:.2f}",
                         "-" if b["write_sec"] is None else f"{b['write_sec']:.2f}",
                         f"{b['excess_step_sec']:.2f} ({b['steps_during_write']})",
                         f"{b['boundary_cost_sec']:.2f}", f"{b['boundary_cost_steps']:.2f}"))
    print(tabulate(rows, headers=("backbone", "epochs", "steady step s", *PHASES, "gap s",
                                  "write s", "excess steps s (n)", "boundary s",
                                  "in steady steps"), tablefmt="github"))
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average before {load_before[0]:.2f}, after {load['after'][0]:.2f}; "
          f"num_workers {args.num_workers}; host memory: {host_memory}")
    write_results(args, load_average=load, host_memory=host_memory, results=results)


if __name__ == "__main__":
    main()
