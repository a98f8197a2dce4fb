"""What the console shows while a run trains: one line per trial, from a Tune callback,
instead of Tune's per-trial config boxes.

    14:02:31  2 running, 1 done, 2 pending of 5 | elapsed 0:12:04 | training_logs/run_...
      mit_b5   RUNNING     epoch 1/30 batch 12/3900  loss 1.9321  mAP50     -  img/s    -  0:11:58  ETA     -
      mit_b0   TERMINATED  epoch 30/30               loss 0.4210  mAP50 0.712  img/s 3.41  2:03:11  done

During a trial's epoch the batch count comes from its `logs/progress.json` (the trial reporter
writes it every few seconds); ETA is the epochs left at the trial's mean epoch time so far.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import timedelta
from typing import Any

from ray import tune

from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.run_files import PROGRESS_FILE

REPORT_EVERY_SEC = 30.0
# Trials start (and end) in bursts a fraction of a second apart: one table for the burst, not
# one per trial.
STATUS_CHANGE_GAP_SEC = 5.0


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return str(timedelta(seconds=int(seconds)))


def _number(value: Any, digits: int) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if not math.isfinite(number) else f"{number:.{digits}f}"


class TrialLinesReporter(tune.Callback):
    """One readable line per trial every REPORT_EVERY_SEC seconds, and whenever a trial's
    status changes; the table once more when the run ends."""

    def __init__(self, run_storage: RunStorage, epochs: int, batches_per_epoch: int,
                 stream=None):
        self.run_storage = run_storage
        self.epochs = epochs
        self.batches_per_epoch = batches_per_epoch
        self.stream = stream  # None: sys.stdout at each report (Tune pickles its callbacks)
        self.started = time.time()
        self._last_report = 0.0
        self._last_statuses: dict[str, str] = {}
        self._trial_started: dict[str, float] = {}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.should_report(trials):
            self.report(trials, done=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.report(trials, done=True)

    def should_report(self, trials, done: bool = False) -> bool:
        statuses = {t.trial_id: t.status for t in trials}
        since_last = time.time() - self._last_report
        if done or since_last >= REPORT_EVERY_SEC:
            self._last_statuses = statuses
            return True
        if statuses != self._last_statuses and since_last >= STATUS_CHANGE_GAP_SEC:
            self._last_statuses = statuses  # a change within the gap waits for the next call
            return True
        return False

    def report(self, trials, done: bool, *sys_info: str) -> None:
        self._last_report = now = time.time()
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        header = (f"{time.strftime('%H:%M:%S')}  {counts.get('RUNNING', 0)} running, "
                  f"{counts.get('TERMINATED', 0)} done, {counts.get('PENDING', 0)} pending"
                  + (f", {counts['ERROR']} failed" if counts.get("ERROR") else "")
                  + f" of {len(trials)} | elapsed {_clock(now - self.started)}"
                  + f" | {self.run_storage.uri()}")
        lines = [header] + [self.trial_line(trial, now) for trial in
                            sorted(trials, key=lambda t: t.config["trial"]["name"])]
        print("\n".join(lines), file=self.stream or sys.stdout, flush=True)

    def trial_line(self, trial, now: float) -> str:
        name = trial.config["trial"]["name"]
        result = trial.last_result or {}
        epoch = int(result.get("epoch") or 0)
        if trial.status == "RUNNING":
            self._trial_started.setdefault(name, now - float(result.get("time_total_s") or 0))
        # A running trial's clock ticks; a finished one shows the time it trained.
        elapsed = (now - self._trial_started[name]
                   if trial.status == "RUNNING" and name in self._trial_started
                   else result.get("time_total_s"))
        where = f"epoch {epoch}/{self.epochs}"
        batches_done = epoch * self.batches_per_epoch
        if trial.status == "RUNNING" and epoch < self.epochs:
            live = self._live_progress(name)
            if live and int(live.get("epoch", 0)) == epoch + 1:
                where = (f"epoch {epoch + 1}/{self.epochs} batch {live['batch']}/"
                         f"{self.batches_per_epoch}")
                batches_done += int(live["batch"])
        eta = "done" if trial.status == "TERMINATED" else "-"
        total_batches = self.epochs * self.batches_per_epoch
        if trial.status == "RUNNING" and batches_done and elapsed:
            # The pace so far, batches included, so the first epoch has an ETA too.
            eta = _clock(float(elapsed) * (total_batches - batches_done) / batches_done)
        return (f"  {name:<18} {trial.status:<11} {where:<28} "
                f"loss {_number(result.get('avg_loss'), 4):>7}  "
                f"mAP50 {_number(result.get('map50'), 3):>5}  "
                f"img/s {_number(result.get('images_per_sec'), 2):>5}  "
                f"{_clock(elapsed):>8}  ETA {eta:>8}")

    def _live_progress(self, trial_name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.run_storage.child(trial_name).read_text(PROGRESS_FILE))
        except (OSError, ValueError):
            return None
