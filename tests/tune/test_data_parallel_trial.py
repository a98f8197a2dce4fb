"""A data-parallel trial through the command, as a user runs it: 2 gloo workers on the CPU.

    all_backbones.py --backbones test_mit --gpus-per-trial 0 --workers-per-trial 2 --batch-size 4

One 3-epoch run, interrupted twice, then checked for what every 2-worker trial must leave (one
set of seed files, written by rank 0 only; two placements; weights in the plain layout; its
epochs in Tune's results, reported through Ray Train):
- a worker SIGKILLed after epoch 1 is logged, with --max-failures 1: Tune restarts the trial,
  whose new workers resume from epoch 1's checkpoint;
- then the driver SIGKILLed after the restarted trial logged epoch 2, as a lost head process
  would be (the suite's one killed-driver test), and `--resume RUN_DIR` finishes epoch 3.
Every command runs in a session of its own (tests/tune/helpers.py), so whatever it leaves
running is found and killed.
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.s3 import S3_CREDENTIALS, S3Server

from .helpers import (
    announced_epoch,
    assert_epochs_once,
    assert_trained,
    batch_rows,
    epoch_rows,
    kill_session,
    logged_epochs,
    poll_until,
    process_ended,
    run,
    session_processes,
    signal_once_logged,
    small_run,
    start,
    training_info,
)

pytestmark = pytest.mark.ray

TRIAL = "test_mit"
EPOCHS = 3
WORKERS = 2
GLOBAL_BATCH = 4


def _two_worker_run(data: str, log_dir: Path, name: str, *extra: str) -> tuple[str, ...]:
    # Two CPUs: 0.1 for the trial's own process, 0.95 for each worker (one torch thread).
    return small_run(data, log_dir, name, EPOCHS, "--workers-per-trial", str(WORKERS),
                     "--batch-size", str(GLOBAL_BATCH), "--cpus-per-trial", "2", *extra)


def _resume(run_dir: Path, output_dir: Path, label: str):
    return run(("--resume", str(run_dir), "--no-dashboard", "--no-evaluate", "--verbose", "0"), output_dir, label)


@dataclass
class Interrupted:
    trial: Path
    victim: int  # the worker killed in epoch 2 of the first attempt
    restarted: dict  # training_info.json of the restarted trial, before the driver was killed
    done: list[int]  # epochs logged when the driver was killed
    announced: int  # the epoch of Tune's saved checkpoint then
    failures: int  # Tune's count of the trial's failures then
    output: str  # both commands' stdout and stderr


@pytest.fixture(scope="module")
def bucket(tiny_dataset, tmp_path_factory):
    """The tiny set in a bucket, and this node's cache for it (the two workers share it)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**S3_CREDENTIALS,
                           "CROSSDET_CACHE": str(tmp_path_factory.mktemp("node_cache"))}.items():
            patch.setenv(key, value)
        server = S3Server()
        frames = [k for k in server.upload(tiny_dataset, "tiny") if "/images/" in k]
        yield server, frames
        server.stop()


@pytest.fixture(scope="module")
def interrupted(bucket, tmp_path_factory) -> Interrupted:
    server, frames = bucket
    root = tmp_path_factory.mktemp("interrupted")
    run_dir = root / "logs" / "twice"
    trial = run_dir / TRIAL
    driver = start(_two_worker_run(server.uri("tiny"), root / "logs", "twice", "--max-failures",
                                   "1"), root, "first")
    try:
        if not poll_until(lambda: logged_epochs(trial) == [1], timeout=240,
                          process=driver.process):
            pytest.fail(f"epoch 1 was never logged: {driver.stderr[-3000:]}")
        (victim,) = [p["pid"] for p in training_info(trial)["worker_placements"]
                     if p["rank"] == 1]
        os.kill(victim, signal.SIGKILL)
        assert poll_until(lambda: process_ended(victim), timeout=30)
        signal_once_logged(driver, lambda: len(logged_epochs(trial)), 2, signal.SIGKILL)
        assert driver.process.wait(timeout=60) == -signal.SIGKILL
        # Its Ray (raylet, the trial, both Train workers) goes down with it or is killed
        # here; the trial cannot log past this point.
        assert kill_session(driver.pid), session_processes(driver.pid)
    finally:
        driver.kill()
    restarted = training_info(trial)
    done = logged_epochs(trial)
    # What the resume is handed besides the logs: Tune's saved checkpoint. It trails the rows
    # (a row follows its report), so it can lead them only if the kill fell between the two.
    announced = announced_epoch(run_dir, TRIAL)
    from ray import tune

    (tune_trial,) = tune.ExperimentAnalysis(str(run_dir)).trials
    resumed_run = _resume(run_dir, root, "resume")
    assert resumed_run.process.returncode == 0, resumed_run.stderr[-3000:]
    assert_trained(trial)
    # --data s3://...: both workers (and their restarts, and the resumed run's) on this one
    # node fetched each frame once between them.
    assert {server.full_downloads(k) for k in frames} == {1}
    return Interrupted(trial, victim, restarted, done, announced, tune_trial.num_failures,
                       driver.stdout + driver.stderr + resumed_run.stdout + resumed_run.stderr)


@pytest.fixture
def finished_trial(interrupted) -> Path:
    return interrupted.trial


# -- what every 2-worker trial leaves ---------------------------------------------------------
def test_training_info_records_the_workers_and_their_share(finished_trial):
    info = training_info(finished_trial)
    assert info["status"] == "completed"
    assert (info["workers"], info["per_worker_batch"]) == (WORKERS, GLOBAL_BATCH // WORKERS)
    assert info["host_memory_retained"] is True
    assert info["dataset_fetch"]["reused"] is True  # the resumed run's: the node's copy
    placements = info["worker_placements"]
    assert sorted(p["rank"] for p in placements) == [0, 1]
    assert len({p["pid"] for p in placements}) == WORKERS  # two processes, not one
    assert all(p["node"] and p["node_id"] and p["gpu_ids"] == [] for p in placements)


def test_one_set_of_seed_files_written_by_rank_0_only(finished_trial):
    assert_epochs_once(finished_trial, EPOCHS)
    # Each epoch's steps are those of one process taking the global batch: the rows of
    # rank 1 (which would double them) are not there.
    train_images = training_info(finished_trial)["train_images"]
    rows = batch_rows(finished_trial)
    for epoch in range(1, EPOCHS + 1):
        assert sorted(int(r["batch"]) for r in rows if int(r["epoch"]) == epoch) == \
            list(range(1, math.ceil(train_images / GLOBAL_BATCH) + 1))
    # One checkpoint per epoch, each the epoch's own.
    epoch_files = sorted((finished_trial / "checkpoints").glob("epoch_*.pth"))
    assert [int(f.name[6:9]) for f in epoch_files] == list(range(1, EPOCHS + 1))
    for path in epoch_files:
        assert torch.load(path, weights_only=True)["epoch"] == int(path.name[6:9])
    # The throughput counts the global batch's images: both workers' shares of the split
    # (DistributedSampler pads it to a multiple of the workers), not one worker's half.
    per_worker = math.ceil(train_images / WORKERS)
    for row in epoch_rows(finished_trial):
        counted = float(row["images_per_sec"]) * float(row["epoch_time_sec"])
        assert counted == pytest.approx(per_worker * WORKERS, rel=1e-6)


def test_tune_holds_each_epoch_rank_0_reported_through_ray_train(finished_trial):
    """The main worker's epochs reach the trial's Tune results by Ray Train's own reporting
    (TuneReportCallback): the metrics its epoch rows hold, the last from the resumed run."""
    from ray import tune

    (tune_trial,) = tune.ExperimentAnalysis(str(finished_trial.parent)).trials
    rows = {int(r["epoch"]): float(r["avg_loss"]) for r in epoch_rows(finished_trial)}
    last = tune_trial.last_result
    assert last["epoch"] == EPOCHS
    assert last["avg_loss"] == pytest.approx(rows[EPOCHS], rel=1e-9)
    # Metrics only: a restarted trial finds its checkpoint in the seed files.
    assert "checkpoint_path" not in last and tune_trial.checkpoint is None


def test_the_checkpoint_has_the_plain_detectors_layout(finished_trial):
    from crossdet_ray.models import build_detector

    (newest,) = sorted((finished_trial / "checkpoints").glob(f"epoch_{EPOCHS:03d}_*.pth"))
    state = torch.load(newest, weights_only=True)["model_state_dict"]
    # The plain detector's keys and shapes, as a single process saves them: no DDP "module."
    # prefix, the BatchNorms' own buffers (the five real layouts against the reference's
    # manifest are tests/models' promise).
    plain = build_detector(TRIAL, num_classes=2)
    assert {k: list(v.shape) for k, v in state.items()} == {
        k: list(v.shape) for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)  # strict


def test_the_workers_evaluation_stays_quiet(interrupted):
    """pycocotools' progress, which the engine swallows, is not printed by the workers."""
    output = interrupted.output
    assert "Average Precision" not in output and "index created" not in output, output[-3000:]


# -- a killed worker ----------------------------------------------------------------------------
def test_a_killed_worker_restarts_the_trial_from_its_checkpoint(interrupted):
    assert interrupted.restarted["resumed_at_epochs"] == [2]
    placements = [p["pid"] for p in interrupted.restarted["worker_placements"]]
    assert interrupted.victim not in placements  # new workers
    assert interrupted.failures == 1  # Tune counted the one failure, and retried it
    summary = json.loads((interrupted.trial.parent / "final_summary.json").read_text())
    (result,) = summary["results"]
    assert result["status"] == "completed"


# -- the driver killed, then --resume -------------------------------------------------------------
def test_a_resumed_two_worker_trial_continues_from_its_newest_checkpoint(interrupted):
    trial, done, announced = interrupted.trial, interrupted.done, interrupted.announced
    assert done == [1, 2], "the kill did not fall between epoch 2 and epoch 3"
    assert announced <= len(done) + 1
    # Exactly after the newest safe epoch: nothing the logs showed was trained again.
    assert training_info(trial)["resumed_at_epochs"] == [2, max(len(done), announced) + 1]
    epochs = [torch.load(path, weights_only=True) for path in
              sorted((trial / "checkpoints").glob("epoch_*.pth"))]
    # Each epoch carries the one before's history as its checkpoint saved it: it started there.
    for before, after in zip(epochs, epochs[1:]):
        assert after["history"]["epoch_losses"][:-1] == before["history"]["epoch_losses"]
        assert after["history"]["elapsed_sec"][:-1] == before["history"]["elapsed_sec"]
