"""What a node lacks, found as its trial starts: the `--data` folder, or a GPU that CUDA can
see. One clear failure each, at once, never retried (a restart on that node finds the same,
and a GPU node billed to train on its CPU is worse than no run). And a malformed bucket
dataset, found before any trial starts."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from crossdet_ray.config import TrainConfig
from crossdet_ray.tune import launcher
from crossdet_ray.run_files import FAILURES_FILE
from crossdet_ray.tune.launcher import LaunchConfig, launch

from .helpers import run_in_process, small_run, training_info

pytestmark = pytest.mark.ray


# First: the module's Ray (below) must not be running yet.
def test_a_malformed_bucket_dataset_stops_the_command_before_ray_starts(s3_server, tiny_dataset,
                                                                       tmp_path, capsys):
    import ray

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    label = sorted((broken / "labels").glob("*.txt"))[1]
    label.write_text("7 0.5 0.5\n")  # three numbers short
    s3_server.upload(broken, "broken")

    result = run_in_process(capsys, *small_run(s3_server.uri("broken"), tmp_path / "logs",
                                               "never", 1))

    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("crossdet_ray: error: ")
    assert f"s3://{s3_server.BUCKET}/broken/labels/{label.name}" in line
    assert "Traceback" not in result.stderr
    assert not ray.is_initialized() and not (tmp_path / "logs" / "never").exists()


@pytest.fixture(scope="module")
def ray_with_a_logical_gpu():
    """One Ray for the module's trials: 2 CPUs and one logical GPU, and its workers without
    the suite's opt-in to training on the CPU (CROSSDET_LOGICAL_GPUS=1)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             logging_level=logging.WARNING,
             runtime_env={"env_vars": {"CROSSDET_LOGICAL_GPUS": "0"}})
    try:
        yield
    finally:
        ray.shutdown()


def test_a_data_folder_missing_on_the_trials_node_fails_it_unretried(
        ray_with_a_logical_gpu, tiny_dataset, tmp_path, monkeypatch, capsys):
    data = tmp_path / "rgbx"
    shutil.copytree(tiny_dataset, data)
    connect = launcher.connect_ray

    def lose_the_data_then_connect(config):
        # The driver's preflight saw the folder; the node the trial lands on has none, as an
        # autoscaled GPU node lacks a folder copied to the head only.
        shutil.rmtree(data)
        return connect(config)

    monkeypatch.setattr(launcher, "connect_ray", lose_the_data_then_connect)
    result = run_in_process(capsys, *small_run(str(data), tmp_path / "logs", "lost", 3,
                                               "--max-failures", "3"))

    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "lost"
    info = training_info(run_dir / "test_mit")
    assert info["status"] == "failed" and info["failure_kind"] == "data"
    error = info["error"]
    assert f"--data {data} does not exist on node " in error
    assert "s3://" in error and "same path on every node" in error
    # One attempt: --max-failures 3 was not spent on a failure a restart cannot mend.
    assert len(json.loads((run_dir / "test_mit" / FAILURES_FILE).read_text())) == 1
    summary = json.loads((run_dir / "final_summary.json").read_text())
    (row,) = summary["results"]
    assert row["status"] == "failed" and row["failure_kind"] == "data"
    assert "does not exist on node" in row["error"]
    assert "does not exist on node" in result.stdout  # the closing table


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA sees a GPU here")
def test_a_granted_gpu_cuda_cannot_see_fails_the_trial_unretried(ray_with_a_logical_gpu,
                                                                  tiny_dataset, tmp_path):
    train = TrainConfig(data=tiny_dataset, epochs=2, batch_size=2, num_workers=0,
                        backbones=["test_mit"], min_size=64, max_size=64, log_dir=str(tmp_path))
    outcome = launch(LaunchConfig(train=train, name="blind", verbose=0, cpus_per_trial=1,
                                  gpus_per_trial="1", max_failures=3))

    assert outcome.exit_code == 1
    trial = tmp_path / "blind" / "test_mit"
    info = training_info(trial)
    assert info["status"] == "failed" and info["failure_kind"] == "gpu"
    assert "granted 1 GPU on node " in info["error"]
    assert "CUDA cannot see it" in info["error"]
    # Why, for this torch: a CPU-only build, or a CUDA build that finds no driver or device.
    assert ("CPU-only build" if torch.version.cuda is None else "nvidia-smi") in info["error"]
    assert "--gpus-per-trial 0" in info["error"] and "CROSSDET_LOGICAL_GPUS=1" in info["error"]
    assert len(json.loads((trial / FAILURES_FILE).read_text())) == 1  # not retried
    assert not (trial / "logs" / "epoch_metrics.csv").exists() or \
        (trial / "logs" / "epoch_metrics.csv").read_text().count("\n") <= 1  # nothing trained
    (row,) = outcome.summary["results"]
    assert row["failure_kind"] == "gpu"
