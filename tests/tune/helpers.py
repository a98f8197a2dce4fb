"""Reading a run directory back, as a user would: CSVs, JSON, the seed's layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path


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
