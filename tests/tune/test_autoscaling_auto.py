"""`--gpus-per-trial auto` on an autoscaling cluster, end to end: a CPU-less, GPU-less head
whose autoscaler can launch GPU nodes; the command, left at its default `auto`, must plan for
those nodes, make the autoscaler launch one, and train there with a GPU share."""

from __future__ import annotations

import json

import pytest

from .fake_autoscaler import GPU_TYPE_MAX_WORKERS
from .helpers import assert_epochs_once, assert_trained, ray_env, run, training_info

pytestmark = pytest.mark.ray


def test_auto_plans_for_launchable_gpu_nodes_and_the_trial_runs_on_one(
        fake_autoscaling_cluster, tiny_dataset, tmp_path):
    import ray

    cluster = fake_autoscaling_cluster
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert ray.cluster_resources().get("GPU", 0) == 0  # nothing to plan for, today
    finally:
        ray.shutdown()

    command = run(("--address", cluster.address, "--autoscaling", "--backbones", "test_mit",
                   "--epochs", "1", "--data", tiny_dataset, "--min-size", "64",
                   "--max-size", "64", "--num-workers", "0", "--log-dir", str(tmp_path / "logs"),
                   "--name", "autoscaled", "--verbose", "0"),
                  tmp_path, "autoscaled", timeout=400, env=cluster.env())
    assert command.process.returncode == 0, (command.stderr[-4000:], cluster.monitor_log())

    run_dir = tmp_path / "logs" / "autoscaled"
    run_config = json.loads((run_dir / "run_config.json").read_text())
    # Planned for the launchable gpu_small nodes (1 CPU, 1 GPU of 24 GB, up to 2), not the head.
    assert run_config["cluster"]["total_gpus"] == GPU_TYPE_MAX_WORKERS
    assert run_config["cluster"]["gpu_memory_gb"] == 24
    share = run_config["resources"]["test_mit"]
    assert 0 < share["gpu"] <= 1 and share["cpu"] <= 1 and share["workers"] == 1
    # The planner's plan is for those nodes too, and says so.
    assert run_config["plan"]["cluster"]["gpus"] == GPU_TYPE_MAX_WORKERS
    assert [t["gpus"] for t in run_config["plan"]["trials"]] == [share["gpu"]]

    trial_dir = run_dir / "test_mit"
    assert_epochs_once(trial_dir, 1)
    assert_trained(trial_dir)
    info = training_info(trial_dir)
    assert info["resources"] == share
    assert info["gpu_ids"] == ["0"]
    assert info["node_id"] not in before, "the trial ran on a node that was there before"
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        node = next(n for n in ray.nodes() if n["NodeID"] == info["node_id"])
    finally:
        ray.shutdown()
    assert node["Resources"].get("GPU") == 1 and node["Resources"].get("gpu_memory_24gb") == 1
    # The fake node's GPU is logical: the trial says it trains on the CPU rather than hide it.
    assert "TRAINING ON THE CPU" in command.stdout + command.stderr


def test_auto_without_gpus_or_known_node_types_is_refused(tiny_dataset, tmp_path):
    """A local Ray has no autoscaler config to read and no GPU: `auto` would train on the CPU
    of a cluster that may be able to launch GPU nodes, so the command stops and says why."""
    env = {**ray_env(), "HOME": str(tmp_path)}  # no ~/ray_bootstrap_config.yaml to be found
    command = run(("--address", "local", "--autoscaling", "--backbones", "test_mit", "--epochs",
                   "1", "--data",
                   tiny_dataset, "--log-dir", str(tmp_path / "logs"), "--no-dashboard", "--no-evaluate",
                   "--verbose", "0"), tmp_path, "refused", timeout=300, env=env)
    assert command.process.returncode == 2, command.stderr[-3000:]
    assert "--autoscaling: cannot find the node types" in command.stderr
    assert "--plan-for" in command.stderr and "Traceback" not in command.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
