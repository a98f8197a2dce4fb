"""Fixtures of the Ray tests that need a cluster of their own."""

from __future__ import annotations

import pytest

from .fake_autoscaler import FakeAutoscalingCluster


@pytest.fixture(scope="module")
def fake_autoscaling_cluster(tmp_path_factory):
    """A running Ray whose autoscaler launches `gpu_small` nodes (1 CPU, 1 logical GPU of
    24 GB; up to 2) on demand, from none; its head has no CPU and no GPU. Yields the cluster
    (`.address` to join it with `.env()`); afterwards none of its processes is left."""
    cluster = FakeAutoscalingCluster.start(tmp_path_factory.mktemp("fake_autoscaling"))
    try:
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes(), f"left running: {cluster.processes()}"
