"""Trials on an autoscaling cluster, end to end: a CPU-less, GPU-less head whose autoscaler
can launch GPU nodes of 24 GB (1 CPU), 48 GB (2 CPUs) and 80 GB (never launched, as with a
GPU quota of 0). `--gpus-per-trial auto` plans for those nodes and trains on a launched one;
each trial lands on the GPU size that holds it with that type's CPU share; a trial no node can
be launched for is reported after --pending-timeout and the run ends with exit 2."""

from __future__ import annotations

import json

import pytest

from .fake_autoscaler import (GPU_TYPE_MAX_WORKERS, GPU_TYPE_RESOURCES, LARGE_GPU_TYPE_RESOURCES,
                              NEVER_LAUNCHED_TYPE_RESOURCES)
from .helpers import assert_epochs_once, assert_trained, ray_env, run, training_info

# Every GPU of the node types the autoscaler may launch (plans count them all).
LAUNCHABLE_GPUS = GPU_TYPE_MAX_WORKERS + 1 + 1


def node_resources(cluster, node_id: str) -> dict:
    import ray

    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        return next(n for n in ray.nodes() if n["NodeID"] == node_id)["Resources"]
    finally:
        ray.shutdown()

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
    # Planned for the launchable GPU nodes, not the head: the smallest GPU is 24 GB.
    assert run_config["cluster"]["total_gpus"] == LAUNCHABLE_GPUS
    assert run_config["cluster"]["gpu_memory_gb"] == 24
    share = run_config["resources"]["test_mit"]
    assert 0 < share["gpu"] <= 1 and share["cpu"] <= 1 and share["workers"] == 1
    # The planner's plan is for those nodes too, and says so.
    assert run_config["plan"]["cluster"]["gpus"] == LAUNCHABLE_GPUS
    assert [t["gpus"] for t in run_config["plan"]["trials"]] == [share["gpu"]]

    trial_dir = run_dir / "test_mit"
    assert_epochs_once(trial_dir, 1)
    assert_trained(trial_dir)
    info = training_info(trial_dir)
    assert info["resources"] == share
    assert info["gpu_ids"] == ["0"]
    assert info["node_id"] not in before, "the trial ran on a node that was there before"
    # test_mit is small: it goes to the smallest GPUs, leaving the large ones free.
    node = node_resources(cluster, info["node_id"])
    assert node.get("GPU") == 1 and node.get("gpu_memory_24gb") == 1
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


def test_each_trial_lands_on_the_gpu_size_that_holds_it_with_that_types_cpu_share(
        fake_autoscaling_cluster, tmp_path):
    """At 0.1 GPU per trial, test_mit (about 1 GB at 64 px) fits 0.1 of a 24 GB GPU; mit_b5
    (its 197 M parameters alone take 2.4 GB with gradients and momentum) does not, but fits
    0.1 of a 48 GB one. Each lands there, with 0.1 of its node type's CPUs."""
    from crossdet_ray.data.synthetic import generate_dataset

    cluster = fake_autoscaling_cluster
    # 4 frames (3 to train, 1 to test): where each trial lands is the point, not what it learns.
    data = generate_dataset(tmp_path / "data", 4, seed=0, sizes=[(64, 64)])
    command = run(("--address", cluster.address, "--autoscaling", "--gpus-per-trial", "0.1",
                   "--backbones", "test_mit", "mit_b5", "--epochs", "1", "--data", str(data),
                   "--min-size", "64", "--max-size", "64", "--num-workers", "0",
                   "--log-dir", str(tmp_path / "logs"), "--name", "sized", "--no-evaluate",
                   "--verbose", "0"),
                  tmp_path, "sized", timeout=400, env=cluster.env())
    assert command.process.returncode == 0, (command.stderr[-4000:], cluster.monitor_log())
    run_dir = tmp_path / "logs" / "sized"
    planned = {t["backbone"]: t for t in
               json.loads((run_dir / "run_config.json").read_text())["plan"]["trials"]}
    for backbone, node_type in (("test_mit", GPU_TYPE_RESOURCES),
                                ("mit_b5", LARGE_GPU_TYPE_RESOURCES)):
        (memory,) = [k for k in node_type if k.startswith("gpu_memory_")]
        info = training_info(run_dir / backbone)
        assert info["resources"]["gpu"] == 0.1
        assert info["resources"]["gpu_memory_resource"] == memory
        assert info["resources"]["cpu"] == 0.1 * node_type["CPU"]
        assert planned[backbone]["cpus"] == 0.1 * node_type["CPU"]
        assert f"gpu_memory_{planned[backbone]['gpu_memory_gb']:g}gb" == memory
        assert node_resources(cluster, info["node_id"]).get(memory) == 1, backbone
        assert_epochs_once(run_dir / backbone, 1)


def test_a_trial_no_node_can_be_launched_for_is_reported_and_the_run_ends(
        fake_autoscaling_cluster, tmp_path):
    """mit_b5 at 0.05 GPU fits only 0.05 of an 80 GB GPU, a type whose launches all fail:
    after --pending-timeout the run stops with the trial's ask, what the cluster has, the
    quota hint and exit 2, and can be resumed."""
    cluster = fake_autoscaling_cluster
    timeout_s = 8
    command = run(("--address", cluster.address, "--autoscaling", "--gpus-per-trial", "0.05",
                   "--backbones", "mit_b5", "--epochs", "1", "--synthetic-images", "4",
                   "--min-size", "64", "--max-size", "64", "--num-workers", "0",
                   "--pending-timeout", str(timeout_s), "--log-dir", str(tmp_path / "logs"),
                   "--name", "stuck", "--verbose", "0"),
                  tmp_path, "stuck", timeout=300, env=cluster.env())
    output = command.stdout + command.stderr
    assert command.process.returncode == 2, output[-4000:]
    assert "Traceback" not in output
    memory = next(k for k in NEVER_LAUNCHED_TYPE_RESOURCES if k.startswith("gpu_memory_"))
    assert f"mit_b5 asks for CPU 0.1, GPU 0.05, {memory} 0.001 on one node" in output
    assert "up to 1 x (CPU 1, GPU 1, gpu_memory_80gb 1)" in output  # what can be launched
    assert "quota" in output and f"--resume {tmp_path / 'logs' / 'stuck'}" in output
    summary = json.loads((tmp_path / "logs" / "stuck" / "final_summary.json").read_text())
    (stuck,) = summary["unplaceable"]
    assert stuck["trial"] == "mit_b5" and stuck["waited_s"] >= timeout_s
    assert summary["interrupted_by"] == "pending_timeout"
    assert [r["status"] for r in summary["results"]] != ["completed"]
