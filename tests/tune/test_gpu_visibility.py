"""A GPU that Ray grants and CUDA cannot see: the trial fails at once, naming its node and why,
and is not retried (a GPU node billed to train on its CPU is worse than no run)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from crossdet_ray.config import TrainConfig
from crossdet_ray.tune.failures import FAILURES_FILE
from crossdet_ray.tune.launcher import LaunchConfig, launch

from .helpers import training_info

pytestmark = pytest.mark.ray


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA sees a GPU here")
def test_a_granted_gpu_cuda_cannot_see_fails_the_trial_unretried(tiny_dataset, tmp_path):
    import ray

    # One logical GPU, without the tests' opt-in (CROSSDET_LOGICAL_GPUS=1) for the trials.
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             logging_level=logging.WARNING,
             runtime_env={"env_vars": {"CROSSDET_LOGICAL_GPUS": "0"}})
    try:
        train = TrainConfig(data=tiny_dataset, epochs=2, batch_size=2, num_workers=0,
                            backbones=["test_mit"], min_size=64, max_size=64,
                            log_dir=str(tmp_path))
        outcome = launch(LaunchConfig(train=train, name="blind", verbose=0, cpus_per_trial=1,
                                      gpus_per_trial="1", max_failures=3))
    finally:
        ray.shutdown()

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
