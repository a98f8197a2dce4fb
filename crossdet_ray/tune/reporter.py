"""The trial reporter: one backbone's progress into Ray Tune and into the seed's files.

Once per epoch it hands a snapshot of the epoch checkpoint to the seed-layout writer, which
commits it on a background thread (see crossdet_ray.engine.run_logs): the file is written to the
trial directory on Tune's storage, then this reporter's `tune.report` announces it with every
epoch metric and a Tune checkpoint (Tune's session takes reports from any thread of the trial,
in order, and returns once Tune has registered the checkpoint), and only then are the epoch's
rows written. The Tune checkpoint holds only a small pointer to the seed's
`checkpoints/epoch_XXX_*.pth` (plus the epoch's rows, so they can be restored), so each
checkpoint is stored once. The next epoch trains meanwhile.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable

from ray import tune

from crossdet_ray.run_files import PROGRESS_FILE
from crossdet_ray.engine.json_files import dumps_json

if TYPE_CHECKING:  # types only: the driver imports this module and never needs torch
    from crossdet_ray.engine.run_logs import SeedLogWriter
    from crossdet_ray.engine.storage import RunStorage
    from crossdet_ray.engine.train import BatchMetrics, EpochMetrics, TrainingSummary

logger = logging.getLogger(__name__)

POINTER_FILE = "crossdet_checkpoint.json"


def report_metrics(metrics: EpochMetrics) -> dict[str, Any]:
    """Tune's metrics: numbers only (None is dropped; booleans become 0/1 for TensorBoard)."""
    values = {}
    for key, value in metrics.as_dict().items():
        if value is None or key == "timestamp":
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float) and not math.isfinite(value):
            continue
        values[key] = value
    return values


def read_checkpoint_pointer(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    """{"epoch", "path", "backbone", "log"} of a Tune checkpoint this reporter made."""
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, POINTER_FILE)) as handle:
            return json.load(handle)


def load_trial_checkpoint(checkpoint: tune.Checkpoint, trial_storage: RunStorage) -> dict[str, Any]:
    """The seed checkpoint dict a Tune checkpoint points to (e.g. `ResultGrid[i].checkpoint`)."""
    pointer = read_checkpoint_pointer(checkpoint)
    return trial_storage.load_torch(pointer["path"])


def announce_to_tune(metrics: dict[str, Any], pointer: dict[str, Any]) -> None:
    """`tune.report` the epoch's metrics with a Tune checkpoint holding only `pointer`."""
    with tempfile.TemporaryDirectory() as pointer_dir:
        with open(os.path.join(pointer_dir, POINTER_FILE), "w") as handle:
            handle.write(dumps_json(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(pointer_dir))


# Tells Tune of a committed epoch: (metrics, pointer). In a trial it is `announce_to_tune`; in
# a data-parallel trial's main worker, a report to Ray Train (tune/data_parallel.py).
Announce = Callable[[dict[str, Any], dict[str, Any]], None]


PROGRESS_INTERVAL_SEC = 5.0


class TrialReporter:
    """A `TrainingListener` that feeds Tune and writes the seed's files for one trial."""

    def __init__(self, writer: SeedLogWriter, announce: Announce = announce_to_tune):
        self.writer = writer
        self.announce = announce
        self._batch_seconds = 0.0  # time this reporter took inside the current epoch
        self._progress_written_at = -PROGRESS_INTERVAL_SEC
        self.overhead_sec: list[float] = []  # per epoch: logging, checkpointing, tune.report

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.writer.on_train_start(info)

    def should_stop(self) -> bool:
        return self.writer.should_stop()

    def on_batch_end(self, metrics: BatchMetrics) -> None:
        start = time.perf_counter()
        self.writer.on_batch_end(metrics)
        if start - self._progress_written_at >= PROGRESS_INTERVAL_SEC:
            # Where the epoch is, for the console's progress lines between Tune's reports.
            self._progress_written_at = start
            try:
                self.writer.storage.write_text(PROGRESS_FILE, json.dumps(
                    {"epoch": metrics.epoch, "batch": metrics.batch, "loss": metrics.loss,
                     "time": time.time()}))
            except OSError as error:  # progress is a courtesy: never fail training over it
                logger.debug("cannot write %s: %s", PROGRESS_FILE, error)
        self._batch_seconds += time.perf_counter() - start

    def on_epoch_end(self, metrics: EpochMetrics, checkpoint: dict[str, Any]) -> None:
        start = time.perf_counter()
        # Kept in training_info.json (written with the next update) to show reporting is cheap.
        self.writer.info["reporting_overhead_sec"] = self.overhead_sec
        # Committed in the background: file, then report, then rows (the row means "safe").
        self.writer.on_epoch_end(metrics, checkpoint,
                                 report=lambda path, entry: self._report(metrics, path, entry))
        self.overhead_sec.append(self._batch_seconds + time.perf_counter() - start)
        self._batch_seconds = 0.0

    def _report(self, metrics: EpochMetrics, checkpoint_path: str, entry: dict[str, Any]) -> None:
        self.announce(report_metrics(metrics),
                      {"epoch": metrics.epoch, "path": checkpoint_path,
                       "backbone": self.writer.backbone, "log": entry})

    def on_train_end(self, summary: TrainingSummary, checkpoint: dict[str, Any]) -> None:
        self.writer.on_train_end(summary, checkpoint)
