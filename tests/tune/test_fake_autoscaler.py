"""The node types an autoscaler can launch, read from a live autoscaling cluster, and the fake
autoscaler itself (a GPU request launches a node). In file order: the first test needs the
cluster before any node was launched."""

from __future__ import annotations

import pytest

from crossdet_ray.tune.cluster import NodeType, _monitor_config_path, launchable_node_types

from .fake_autoscaler import GPU_TYPE, GPU_TYPE_MAX_WORKERS, LARGE_GPU_TYPE, NEVER_LAUNCHED_TYPE

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def joined(fake_autoscaling_cluster):
    import ray

    ray.init(address=fake_autoscaling_cluster.address, logging_level="WARNING")
    try:
        yield fake_autoscaling_cluster
    finally:
        ray.shutdown()


def test_launchable_node_types_of_a_cluster_without_gpus_now(joined):
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0
    node_types = sorted(launchable_node_types(), key=lambda t: t.gpu_memory_gb)
    assert node_types == [
        NodeType(name=GPU_TYPE, cpus=1.0, gpus=1.0, gpu_memory_gb=24.0,
                 max_workers=GPU_TYPE_MAX_WORKERS, min_workers=0),
        NodeType(name=LARGE_GPU_TYPE, cpus=2.0, gpus=1.0, gpu_memory_gb=48.0, max_workers=1),
        NodeType(name=NEVER_LAUNCHED_TYPE, cpus=1.0, gpus=1.0, gpu_memory_gb=80.0,
                 max_workers=1)]
    # The resource a trial asks for to land on each type.
    assert [t.gpu_memory_resource for t in node_types] == [
        "gpu_memory_24gb", "gpu_memory_48gb", "gpu_memory_80gb"]
    # Read from the file the running autoscaler was started with (this Ray's autoscaler
    # reports no cluster config to the GCS).
    assert _monitor_config_path() == joined.config_path


def test_a_gpu_task_makes_the_autoscaler_launch_a_gpu_node(joined):
    import ray

    head = {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    @ray.remote(num_gpus=1, num_cpus=1)
    def where() -> tuple[str, list]:
        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

    node_id, gpu_ids = ray.get(where.remote(), timeout=240)
    assert node_id not in head, "the task ran on a node that was there before"
    launched = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    assert launched["Resources"]["GPU"] == 1 and launched["Resources"]["gpu_memory_24gb"] == 1
    assert len(gpu_ids) == 1
