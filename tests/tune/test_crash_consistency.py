"""Crash consistency through the real command: Ctrl-C, a full disk, damaged checkpoints (a
killed driver is tests/tune/test_data_parallel_trial.py's).

The promise under test (crossdet_ray.engine.run_logs): a row in epoch_metrics.csv means the
epoch is safe, and `--resume` continues right after the newest safe epoch whose file loads.
Every command runs in a session of its own, so the Ray processes it starts are found by
session id and killed at the end, whatever happened.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import pytest
import torch

from .helpers import (
    assert_epochs_once,
    assert_trained,
    batch_rows,
    epoch_rows,
    logged_epochs,
    run,
    signal_once_logged,
    small_run,
    start,
    training_info,
)

pytestmark = pytest.mark.ray

TRIAL = "test_mit"


def _epoch_files(trial_dir) -> list:
    return sorted((trial_dir / "checkpoints").glob("epoch_*.pth"))


def _resume(run_dir, output_dir, label: str):
    return run(("--resume", str(run_dir), "--no-dashboard", "--no-evaluate", "--verbose", "0"),
               output_dir, label)


# -- a full disk --------------------------------------------------------------------------------
def _checkpoint_bytes(tiny_dataset: str) -> int:
    """The size of one test_mit epoch checkpoint as the trial writes it: the model, SGD's
    momentum buffers (made by a step) and the scheduler, for the dataset's classes."""
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.data import check_dataset
    from crossdet_ray.engine.checkpoint import build_checkpoint
    from crossdet_ray.engine.train import build_model, build_optimizer

    num_classes = check_dataset(tiny_dataset).num_classes + 1  # + background, as fit() counts
    config = TrainConfig(data=tiny_dataset, backbones=[TRIAL], min_size=64, max_size=64)
    model = build_model(config, TRIAL, num_classes)
    optimizer, scheduler = build_optimizer(config, model)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    checkpoint = build_checkpoint(
        epoch=1, backbone=TRIAL, model=model, optimizer=optimizer, scheduler=scheduler, loss=1.0,
        best_loss=1.0, best_epoch=1, config=config.to_dict(), history={"epoch_losses": [1.0]},
        num_classes=num_classes)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return len(buffer.getvalue())


def test_a_full_disk_fails_the_trial_once_and_resume_finishes_it(tiny_dataset, tmp_path,
                                                                  small_disk):
    checkpoint = _checkpoint_bytes(tiny_dataset)
    # Epoch 1's file fits (best_model.pth is a hard link to it, no more space), and so do
    # Tune's files, the logs and the summary (well under a MB) in the half checkpoint left;
    # epoch 2's file needs a whole checkpoint more.
    disk = small_disk(checkpoint * 3 // 2, kernel=True)
    run_dir = disk.path / "full"
    trial = run_dir / TRIAL

    failed = run(small_run(tiny_dataset, disk.path, "full", 3, "--max-failures", "2",
                           "--skip-disk-check"), tmp_path,
                 "full")
    assert failed.process.returncode == 1, failed.stderr[-3000:]
    epoch_2 = re.compile(re.escape(str(trial / "checkpoints")) + r"/epoch_002_loss_\S+\.pth")
    summary_lines = [line for line in failed.stdout.splitlines() if "disk full" in line]
    assert len(summary_lines) == 1, failed.stdout[-3000:]
    assert summary_lines[0].startswith(f"FAILED {TRIAL}: disk full: could not write ")
    assert epoch_2.search(summary_lines[0]), summary_lines[0]
    # Nothing else was reported full (the trial's own record of the failure fitted).
    disk_full_lines = [line for line in (failed.stdout + failed.stderr).splitlines()
                       if "disk full" in line]
    assert all(epoch_2.search(line) for line in disk_full_lines), disk_full_lines

    # Attempted once although --max-failures 2 allowed retries: Tune counted one failure, and
    # no attempt resumed (a retry would have resumed at epoch 2).
    from ray import tune

    (tune_trial,) = tune.ExperimentAnalysis(str(run_dir)).trials
    assert (tune_trial.status, tune_trial.num_failures) == ("ERROR", 1)
    info = training_info(trial)
    assert (info["status"], info["failure_kind"], info["resumed_at_epochs"]) == \
        ("failed", "disk_full", [])

    # The epoch before the failure is intact and loadable; the failed write left no temporary.
    (epoch_1,) = _epoch_files(trial)
    assert epoch_1.name.startswith("epoch_001_loss_")
    assert torch.load(epoch_1, weights_only=True)["epoch"] == 1
    assert list(run_dir.rglob("*.tmp-*")) == []
    assert logged_epochs(trial) == [1]
    assert {int(r["epoch"]) for r in batch_rows(trial)} == {1}
    # The summary fitted in the space the failed write gave back.
    summary = json.loads((run_dir / "final_summary.json").read_text())
    assert summary["num_failed"] == 1
    assert epoch_2.search(summary["results"][0]["error"])

    # Room for epochs 2 and 3 and the final weights (about half a checkpoint) beside epoch 1.
    disk.resize(checkpoint * 5)
    resumed = _resume(run_dir, tmp_path, "resume")
    assert resumed.process.returncode == 0, resumed.stderr[-3000:]
    assert_epochs_once(trial, 3)
    info = training_info(trial)
    assert info["status"] == "completed"
    assert info["resumed_at_epochs"] == [2]


# -- damaged checkpoints ----------------------------------------------------------------------
# Two trials of one run (--lr-grid 1 0.5), resumed once after Ctrl-C with their files damaged
# in two ways: PARTLY's newest epoch file truncated, every epoch file of WHOLLY truncated.
PARTLY, WHOLLY = f"{TRIAL}_lr0.005", f"{TRIAL}_lr0.0025"
DAMAGED_EPOCHS = 10  # far more than either trial logs before the other starts


@pytest.fixture(scope="module")
def interrupted_run(tiny_dataset, tmp_path_factory):
    """A run of two trials stopped by one Ctrl-C once PARTLY logged epoch 2 and WHOLLY epoch 1:
    (run dir, epochs logged by each trial).

    The drain lets the checkpoints in flight land, so PARTLY has an epoch file older than its
    newest, WHOLLY has at least one, and neither reached the last epoch. This run shows its dashboard, as a local run does by default. (An
    undamaged resume after Ctrl-C is tests/tune/test_s3_storage.py's, in S3.)
    """
    root = tmp_path_factory.mktemp("interrupted")
    run_dir = root / "logs" / "damaged"
    args = [a for a in small_run(tiny_dataset, root / "logs", "damaged", DAMAGED_EPOCHS,
                                 "--lr-grid", "1", "0.5")
            if a != "--no-dashboard"]
    driver = start(args, root, "first")
    try:
        signal_once_logged(driver, lambda: min(len(logged_epochs(run_dir / PARTLY)),
                                               2 * len(logged_epochs(run_dir / WHOLLY))), 2)
        assert driver.wait(timeout=180) == 130, driver.stderr[-3000:]
    finally:
        driver.kill()
    assert "--resume" in driver.stderr
    # A local run starts Ray's dashboard on the loopback interface only, and says where.
    assert "Ray dashboard: http://127.0.0.1:" in driver.stderr
    done = {}
    for name in (PARTLY, WHOLLY):
        trial = run_dir / name
        logged = logged_epochs(trial)
        assert logged == list(range(1, len(logged) + 1))
        assert (2 if name == PARTLY else 1) <= len(logged) < DAMAGED_EPOCHS, (name, logged)
        assert [int(f.name[6:9]) for f in _epoch_files(trial)] == logged
        assert training_info(trial)["epochs_completed"] == len(logged)
        assert_trained(trial)
        done[name] = len(logged)
    return run_dir, done


def _truncate_to_half(path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.fixture(scope="module")
def damaged_resume(interrupted_run, tmp_path_factory):
    """A copy of the interrupted run, damaged, then resumed: (copy, epochs done by each trial,
    PARTLY's truncated file, WHOLLY's truncated files, WHOLLY's rows and record before,
    the resume's result). The copy's hard links become separate files, so damaging an epoch
    file leaves best_model.pth as it was."""
    source, done = interrupted_run
    tmp_path = tmp_path_factory.mktemp("damaged")
    run_dir = tmp_path / "logs" / source.name
    shutil.copytree(source, run_dir)
    newest = _epoch_files(run_dir / PARTLY)[-1]
    assert newest.name.startswith(f"epoch_{done[PARTLY]:03d}_")
    _truncate_to_half(newest)
    wholly = run_dir / WHOLLY
    before = (epoch_rows(wholly), batch_rows(wholly), training_info(wholly))
    damaged = _epoch_files(wholly)
    assert len(damaged) == done[WHOLLY]
    for path in damaged:
        _truncate_to_half(path)
    resumed = _resume(run_dir, tmp_path, "resume")
    return run_dir, done, newest, damaged, before, resumed


def test_a_truncated_newest_checkpoint_is_skipped_and_its_epoch_trained_again(damaged_resume):
    run_dir, done, newest, _, _, resumed = damaged_resume
    trial = run_dir / PARTLY
    warnings = [line for line in resumed.stderr.splitlines()
                if "cannot be read" in line and str(trial) in line]
    assert len(warnings) == 1 and str(newest) in warnings[0], warnings
    info = training_info(trial)
    assert info["unreadable_checkpoints"] == [str(newest)]
    # From the epoch before the damaged one, which is trained again.
    assert info["resumed_at_epochs"] == [done[PARTLY]]
    assert info["status"] == "completed"
    assert_epochs_once(trial, DAMAGED_EPOCHS)


def test_when_every_checkpoint_is_damaged_the_trial_fails_naming_them(damaged_resume):
    run_dir, _, _, damaged, before, resumed = damaged_resume
    trial = run_dir / WHOLLY
    assert resumed.process.returncode == 1, resumed.stderr[-3000:]
    failures = [line for line in resumed.stdout.splitlines() if line.startswith("FAILED ")]
    assert len(failures) == 1, resumed.stdout[-3000:]
    assert failures[0].startswith(f"FAILED {WHOLLY}: no epoch checkpoint of ")
    summary = json.loads((run_dir / "final_summary.json").read_text())
    row = next(r for r in summary["results"] if r["trial"] == WHOLLY)
    assert row["status"] == "failed"
    for path in damaged:
        assert str(path) in failures[0] and str(path) in row["error"], path
    # Not retried: the files will not mend themselves.
    from ray import tune

    failures_by_trial = {t.config["trial"]["name"]: t.num_failures
                         for t in tune.ExperimentAnalysis(str(run_dir)).trials}
    assert failures_by_trial[WHOLLY] == 1
    # A trial that failed before training keeps the earlier attempts' rows and record, with
    # only the verdict added.
    assert (epoch_rows(trial), batch_rows(trial)) == before[:2]
    info = training_info(trial)
    assert info["status"] == "failed"
    for key in ("epochs_completed", "model_parameters", "train_started_at", "resumed_at_epochs"):
        assert info.get(key) == before[2].get(key), key
