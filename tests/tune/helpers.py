"""Reading a run directory back, as a user would: CSVs, JSON, the seed's layout."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path
from typing import Callable


def epoch_rows(trial_dir: Path) -> list[dict[str, str]]:
    with open(trial_dir / "logs" / "epoch_metrics.csv") as handle:
        return list(csv.DictReader(handle))


def batch_rows(trial_dir: Path) -> list[dict[str, str]]:
    with open(trial_dir / "logs" / "batch_metrics.csv") as handle:
        return list(csv.DictReader(handle))


def training_info(trial_dir: Path) -> dict:
    return json.loads((trial_dir / "logs" / "training_info.json").read_text())


def windows(run_dir: Path, trials: list[str]) -> list[tuple[float, float]]:
    """(start, end) of each trial's training, from its own training_info.json."""
    spans = []
    for trial in trials:
        info = training_info(run_dir / trial)
        spans.append((info["train_started_at"], info["train_finished_at"]))
    return spans


def max_concurrency(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda item: (item[0], item[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def assert_epochs_once(trial_dir: Path, epochs: int) -> None:
    assert [int(r["epoch"]) for r in epoch_rows(trial_dir)] == list(range(1, epochs + 1))
    batches = [(int(r["epoch"]), int(r["batch"])) for r in batch_rows(trial_dir)]
    assert len(batches) == len(set(batches)), "a batch row is duplicated"
    assert sorted({e for e, _ in batches}) == list(range(1, epochs + 1))


# Reading files another process is writing: not there yet, or not yet holding the key.
READ_RACES = (FileNotFoundError, KeyError, json.JSONDecodeError)

# Tune registers a reported checkpoint only after a second round trip to the trial's actor (a
# `save` task), so a `checkpoint_*` directory can exist that a restarted trial never sees. A
# trial that has logged this many epochs reported the first epoch's checkpoint a whole epoch
# ago: an interrupt from then on resumes at epoch 2 or later.
EPOCHS_LOGGED_ONCE_TUNE_HOLDS_A_CHECKPOINT = 2


def tune_holds_a_checkpoint(trial_dir: Path) -> bool:
    """True once an interrupt of this trial resumes it from a checkpoint (see above)."""
    return len(epoch_rows(trial_dir)) >= EPOCHS_LOGGED_ONCE_TUNE_HOLDS_A_CHECKPOINT


def poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05,
               process: subprocess.Popen | None = None) -> bool:
    """True once `condition()` holds; False if `timeout` seconds pass or `process` ends first.

    A condition that raises one of READ_RACES counts as not yet true.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return True
        except READ_RACES:
            pass
        if process is not None and process.poll() is not None:
            return False
        time.sleep(interval)
    return False
