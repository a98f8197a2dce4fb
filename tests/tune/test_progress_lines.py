"""The console's progress lines: one per trial, with its place in the run and an ETA from
the pace so far (batches included, so a first epoch has one), and one table per burst of
status changes rather than one per trial."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.tune.progress import STATUS_CHANGE_GAP_SEC, TrialLinesReporter
from crossdet_ray.run_files import PROGRESS_FILE


def _trial(name: str, status: str, **result) -> SimpleNamespace:
    return SimpleNamespace(trial_id=name, status=status, config={"trial": {"name": name}},
                           last_result=result)


def _reporter(tmp_path, epochs=3, batches=16) -> TrialLinesReporter:
    return TrialLinesReporter(RunStorage.from_uri(str(tmp_path)), epochs=epochs,
                              batches_per_epoch=batches)


def test_a_running_trial_shows_its_batch_and_an_eta_from_its_pace(tmp_path):
    reporter = _reporter(tmp_path)
    progress = tmp_path / "mit_b0" / PROGRESS_FILE
    progress.parent.mkdir(parents=True)
    progress.write_text(json.dumps({"epoch": 2, "batch": 8, "loss": 0.5}))
    trial = _trial("mit_b0", "RUNNING", epoch=1, time_total_s=100.0, avg_loss=0.68,
                   map50=0.304, images_per_sec=0.19)
    line = reporter.trial_line(trial, now=1000.0)
    # 16 + 8 of 48 batches in 100 s: the other 24 take 100 s more.
    assert "epoch 2/3 batch 8/16" in line
    assert line.rstrip().endswith("ETA  0:01:40")
    assert "loss  0.6800" in line and "mAP50 0.304" in line and "img/s  0.19" in line
    assert line.split()[0] == "mit_b0"


def test_a_first_epoch_has_an_eta_before_any_epoch_ends(tmp_path):
    reporter = _reporter(tmp_path, epochs=2, batches=10)
    progress = tmp_path / "mit_b5" / PROGRESS_FILE
    progress.parent.mkdir(parents=True)
    progress.write_text(json.dumps({"epoch": 1, "batch": 4}))
    reporter.trial_line(_trial("mit_b5", "RUNNING"), now=500.0)  # seen running from t=500
    line = reporter.trial_line(_trial("mit_b5", "RUNNING"), now=560.0)
    # 4 of 20 batches in 60 s: 16 more take 240 s.
    assert "epoch 1/2 batch 4/10" in line and line.rstrip().endswith("ETA  0:04:00")


def test_finished_and_pending_trials(tmp_path):
    reporter = _reporter(tmp_path)
    reporter.trial_line(_trial("mit_b1", "RUNNING", epoch=2, time_total_s=20.0), now=100.0)
    # Finished: its clock stops at the time it trained, however late the table is drawn.
    done = reporter.trial_line(_trial("mit_b1", "TERMINATED", epoch=3, time_total_s=30.0),
                               now=900.0)
    assert "epoch 3/3" in done and done.rstrip().endswith("0:00:30  ETA     done")
    pending = reporter.trial_line(_trial("mit_b2", "PENDING"), now=0.0)
    assert "epoch 0/3" in pending and pending.rstrip().endswith("ETA        -")


def test_one_table_for_a_burst_of_status_changes(tmp_path):
    reporter = _reporter(tmp_path)
    names = ["mit_b0", "mit_b1", "mit_b2"]
    assert reporter.should_report([_trial(n, "PENDING") for n in names])
    reporter._last_report = time.time()  # what report() records
    # Trials start a fraction of a second apart: no table for each.
    assert not reporter.should_report([_trial("mit_b0", "RUNNING"), _trial("mit_b1", "PENDING"),
                                       _trial("mit_b2", "PENDING")])
    assert not reporter.should_report([_trial(n, "RUNNING") for n in names])
    # Once the gap has passed, the change not yet shown is reported.
    reporter._last_report = time.time() - STATUS_CHANGE_GAP_SEC - 0.1
    assert reporter.should_report([_trial(n, "RUNNING") for n in names])
    reporter._last_report = time.time()
    assert not reporter.should_report([_trial(n, "RUNNING") for n in names])
    assert reporter.should_report([_trial(n, "TERMINATED") for n in names], done=True)
