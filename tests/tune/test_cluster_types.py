"""Node types a plan is made for: `--plan-for` strings and an autoscaler's cluster config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crossdet_ray.tune.cluster import (
    PLAN_FOR_CPUS_PER_GPU,
    ClusterDiscoveryError,
    NodeType,
    PlanForError,
    launchable_node_types,
    node_types_from_autoscaling_config,
    parse_plan_for,
)
from crossdet_ray.tune.resources import ResourceError

ROOT = Path(__file__).resolve().parents[2]


def test_one_node_of_gpus():
    assert parse_plan_for("8x80") == [NodeType(
        name="plan_for_8x80", cpus=8.0 * PLAN_FOR_CPUS_PER_GPU, gpus=8.0, gpu_memory_gb=80.0,
        max_workers=1, min_workers=1)]


def test_nodes_of_gpus():
    (node_type,) = parse_plan_for("2x4x80")
    assert (node_type.gpus, node_type.gpu_memory_gb) == (4.0, 80.0)
    assert node_type.max_workers == node_type.min_workers == 2
    assert node_type.total_gpus == 8.0


def test_several_node_types_and_fractional_memory():
    small, large = parse_plan_for(" 1x24 , 2X1x40.5 ")
    assert (small.gpus, small.gpu_memory_gb, small.max_workers) == (1.0, 24.0, 1)
    assert (large.gpus, large.gpu_memory_gb, large.max_workers) == (1.0, 40.5, 2)


@pytest.mark.parametrize("text", ["", "80", "8x", "x80", "8x80gb", "2x4x80x1", "8*80", "a8x80",
                                  "0x80", "8x0", "0x4x80", "8x80,", "-1x80"])
def test_malformed_plan_for_names_the_flag_and_an_example(text):
    with pytest.raises(PlanForError) as caught:
        parse_plan_for(text)
    message = str(caught.value)
    assert message.startswith("--plan-for")
    assert "8x80" in message and "2x4x80" in message
    # The command turns ResourceErrors into one line and exit 2.
    assert isinstance(caught.value, ResourceError) and isinstance(caught.value, ValueError)


def test_the_projects_cluster_yaml():
    """cluster.yaml's GPU types, as the autoscaler of a `ray up` cluster sees them."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    node_types = {t.name: t for t in node_types_from_autoscaling_config(config)}
    assert set(node_types) == {"gpu_small", "gpu_large"}  # the head is not launched
    small, large = node_types["gpu_small"], node_types["gpu_large"]
    assert (small.cpus, small.gpus, small.gpu_memory_gb) == (8.0, 1.0, 24.0)
    assert (large.cpus, large.gpus, large.gpu_memory_gb) == (8.0, 1.0, 48.0)
    assert (small.min_workers, small.max_workers) == (0, 4)


def test_cluster_max_workers_caps_each_type_and_is_the_default():
    config = {"max_workers": 3, "head_node_type": "head",
              "available_node_types": {
                  "head": {"resources": {"CPU": 0}},
                  "many": {"resources": {"GPU": 1}, "max_workers": 10},
                  "unstated": {"resources": {"CPU": 4}}}}
    node_types = {t.name: t for t in node_types_from_autoscaling_config(config)}
    assert node_types["many"].max_workers == 3
    assert node_types["unstated"].max_workers == 3
    assert node_types["unstated"].gpus == 0 and node_types["unstated"].gpu_memory_gb is None


def test_an_unreadable_config_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ClusterDiscoveryError, match="nowhere.yaml"):
        launchable_node_types(missing)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ClusterDiscoveryError, match="not a YAML mapping"):
        launchable_node_types(listed)
