"""Trials on a local Ray with one logical GPU: sharing, the resource check, a retried trial.

What a run writes, and that its files agree, is tests/tune/test_outputs.py's; a trial that
keeps failing is tests/tune/test_cli.py's (its exit code); ASHA is tests/tune/test_learning.py's."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
import torch

from crossdet_ray.config import TrainConfig
from crossdet_ray.tune.launcher import LaunchConfig, launch
from crossdet_ray.tune.resources import ResourceError

from .helpers import (assert_epochs_once, assert_trained, epoch_rows, max_concurrency, poll_until,
                      process_ended, training_info, windows)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # One logical GPU (CUDA cannot see it on a CPU-only machine): trials must share it by
    # their fractions. address="local": a Ray of this module's own, never one that
    # RAY_ADDRESS names or `ray start` left on the machine.
    try:
        ray.init(address="local", num_cpus=6, num_gpus=1, include_dashboard=False,
                 logging_level=logging.WARNING)
        yield
    finally:
        ray.shutdown()


def _config(tiny_dataset, log_dir, name, **changes):
    train = TrainConfig(data=tiny_dataset, epochs=changes.pop("epochs", 1), batch_size=2,
                        num_workers=0, backbones=changes.pop("backbones", ["test_mit"]),
                        min_size=64, max_size=64, log_dir=str(log_dir))
    return LaunchConfig(train=train, name=name, verbose=0, cpus_per_trial=1, **changes)


def test_five_trials_at_a_fifth_of_a_gpu_run_at_once(local_ray, tiny_dataset, tmp_path):
    grid = [0.25, 0.5, 1.0, 2.0, 4.0]
    # Epochs enough that each trial trains for longer than their start-ups are spread over.
    outcome = launch(_config(tiny_dataset, tmp_path, "fifths", gpus_per_trial="0.2",
                             lr_grid=grid, epochs=6))
    run_dir = tmp_path / "fifths"
    names = [f"test_mit_lr{0.005 * m:g}" for m in grid]
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(names)
    assert outcome.exit_code == 0 and outcome.summary["num_succeeded"] == 5
    spans = windows(run_dir, names)
    assert max(s for s, _ in spans) < min(e for _, e in spans), "trials did not overlap"
    assert max_concurrency(spans) == 5
    for name in names:
        info = training_info(run_dir / name)
        assert info["resources"] == {"cpu": 1.0, "gpu": 0.2, "workers": 1}
        # The trial's share of the logical GPU is GPU 0: a real one where CUDA sees it, else
        # the trial trains on the CPU (with a warning).
        assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    best = outcome.summary["best_lr_per_backbone"]["test_mit"]
    assert best["lr"] in [0.005 * m for m in grid]
    # Not evaluated: each inference figure is the one timed at the end of its training, and
    # says how many of the other trials were running then (from each trial's own record of
    # when it started, when it finished and when it was timed).
    infos = {name: training_info(run_dir / name) for name in names}
    for row in outcome.summary["results"]:
        begin, end = infos[row["trial"]]["infer_window"]
        others = sum(info["fit_started_at"] <= end and info["train_finished_at"] >= begin
                     for name, info in infos.items() if name != row["trial"])
        assert row["inference_concurrent_trials"] == others
        assert row["inference_measured"] == (
            f"during training, shared with {others} concurrent trial"
            f"{'s' if others != 1 else ''} on its node" if others else
            "during training, no other trial running on its node")
    # All five overlap: the first to finish was timed while the four others still ran.
    first = min(names, key=lambda n: infos[n]["train_finished_at"])
    assert next(r for r in outcome.summary["results"]
                if r["trial"] == first)["inference_concurrent_trials"] == 4


def test_half_gpu_trials_run_two_at_a_time(local_ray, tiny_dataset, tmp_path):
    outcome = launch(_config(tiny_dataset, tmp_path, "halves", gpus_per_trial="0.5",
                             lr_grid=[0.5, 1.0, 2.0, 4.0]))
    assert outcome.summary["num_succeeded"] == 4
    names = [r["trial"] for r in outcome.summary["results"]]
    assert max_concurrency(windows(tmp_path / "halves", names)) <= 2


def test_impossible_request_fails_before_any_trial(local_ray, tiny_dataset, tmp_path):
    # Two GPUs a trial means two data-parallel workers of one GPU each (--workers-per-trial
    # auto); a cluster of one GPU holds one.
    with pytest.raises(ResourceError, match="2 workers of .* and 1 GPU each, but the cluster "
                                            "holds only 1 such workers"):
        launch(_config(tiny_dataset, tmp_path, "impossible", gpus_per_trial="2"))
    # Before any trial: no run directory, so no Tune experiment and no trial files.
    assert not (tmp_path / "impossible").exists()


def test_killed_trial_resumes_from_its_checkpoint(local_ray, tiny_dataset, tmp_path):
    run_dir = tmp_path / "killed"
    victim = run_dir / "test_mit_lr0.005"
    killed = {}

    def kill_at_the_first_logged_epoch():
        # A row promises its epoch is safe, so the first one is trigger enough.
        if poll_until(lambda: len(epoch_rows(victim)) >= 1, timeout=300):
            pid = training_info(victim)["pid"]
            os.kill(pid, signal.SIGKILL)
            # Rows read once the process is gone: another may have landed before the kill.
            if poll_until(lambda: process_ended(pid), timeout=60):
                killed.update(pid=pid, epochs=len(epoch_rows(victim)))

    watcher = threading.Thread(target=kill_at_the_first_logged_epoch, daemon=True)
    watcher.start()
    outcome = launch(_config(tiny_dataset, tmp_path, "killed", epochs=3, gpus_per_trial="0",
                             lr_grid=[0.5, 1.0], max_failures=2))
    watcher.join(timeout=5)
    assert killed, "the trial finished before it could be killed"
    assert killed["epochs"] < 3, "the trial finished before it could be killed"
    assert outcome.exit_code == 0 and outcome.summary["num_succeeded"] == 2
    info = training_info(victim)
    assert info["pid"] != killed["pid"]
    # Exactly after the last epoch logged when it died: nothing logged was trained again.
    assert info["resumed_at_epochs"] == [killed["epochs"] + 1]
    assert_epochs_once(victim, 3)
    assert_trained(victim)
    assert_epochs_once(run_dir / "test_mit_lr0.0025", 3)
