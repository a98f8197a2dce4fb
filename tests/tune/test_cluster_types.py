"""Node types a plan is made for: `--plan-for` strings and an autoscaler's cluster config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crossdet_ray.config import TrainConfig
from crossdet_ray.tune import cluster as cluster_module
from crossdet_ray.tune.cluster import (
    PLAN_FOR_CPUS_PER_GPU,
    ClusterDiscoveryError,
    NodeType,
    PlanForError,
    autoscaling_shape,
    launchable_node_types,
    launchable_shape,
    node_types_from_autoscaling_config,
    parse_plan_for,
    refuse_cpu_trials,
)
from crossdet_ray.tune.launcher import LaunchConfig, plan_run, trial_specs
from crossdet_ray.tune.planner import Workload
from crossdet_ray.tune.resources import (
    ClusterShape,
    ResourceError,
    parse_gpus_per_trial,
    plan_resources,
)

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
    small, large = parse_plan_for(" 1x24 , 2X1x40.5GB ")
    assert (small.gpus, small.gpu_memory_gb, small.max_workers) == (1.0, 24.0, 1)
    assert (large.gpus, large.gpu_memory_gb, large.max_workers) == (1.0, 40.5, 2)


@pytest.mark.parametrize("text", ["", "80", "8x", "x80", "8x80tb", "2x4x80x1", "8*80", "a8x80",
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


# -- what `auto` plans for with --autoscaling ---------------------------------------------------
GPU_SMALL = NodeType(name="gpu_small", cpus=8, gpus=1, gpu_memory_gb=24, max_workers=4)
GPU_LARGE = NodeType(name="gpu_large", cpus=8, gpus=1, gpu_memory_gb=48, max_workers=2)
CPU_ONLY = NodeType(name="cpu", cpus=32, gpus=0, gpu_memory_gb=None, max_workers=10)
GPU_LESS_NOW = ClusterShape(total_cpus=0, total_gpus=0, nodes=({"CPU": 0, "GPU": 0},))


def test_launchable_shape_is_the_gpu_types_at_their_most_nodes():
    shape = launchable_shape([CPU_ONLY, GPU_SMALL, GPU_LARGE])
    assert shape.nodes == ({"CPU": 8, "GPU": 1},) * 6  # no CPU-only node, no head
    assert (shape.total_gpus, shape.total_cpus) == (6, 48)
    assert shape.gpu_memory_gb == 24  # trials are packed for the smallest GPU


def test_launchable_shape_without_gpu_types_is_the_cpu_types():
    shape = launchable_shape([CPU_ONLY])
    assert (shape.total_gpus, shape.total_cpus, len(shape.nodes)) == (0, 320, 10)


def test_a_trials_default_cpus_fit_one_node():
    shape = launchable_shape(parse_plan_for("2x1x24"))
    plan = plan_resources(parse_gpus_per_trial("auto", ["mit_b0"]), ["mit_b0"], 1, shape, None)
    # 16 CPUs in all but 8 on a node: a trial of more than 8 could never be placed.
    assert plan["mit_b0"].cpu == 8.0


def test_the_planner_gives_auto_trials_gpus_of_the_launchable_nodes():
    backbones = ["mit_b0", "mit_b5"]
    config = LaunchConfig(train=TrainConfig(backbones=backbones, epochs=2), autoscaling=True)
    shape = launchable_shape([CPU_ONLY, GPU_SMALL])
    workload = Workload(train_frames=100, epochs=2, batch_size=2, min_size=800)
    resources, plan = plan_run(config, trial_specs(backbones, 0.005, []), shape, workload)
    assert all(0 < r.gpu <= 1 and r.cpu <= GPU_SMALL.cpus for r in resources.values())
    assert plan.cluster["gpus"] == 4  # gpu_small's 4 nodes; not the CPU-only type
    refuse_cpu_trials({t.trial: t.gpus for t in plan.trials}, shape)


def test_autoscaling_shape_reads_the_launchable_types(monkeypatch):
    monkeypatch.setattr(cluster_module, "launchable_node_types", lambda path=None: [GPU_SMALL])
    assert autoscaling_shape(GPU_LESS_NOW).total_gpus == 4


def test_without_known_node_types_a_gpu_less_cluster_is_an_error(monkeypatch):
    def not_found(path=None):
        raise ClusterDiscoveryError("--autoscaling: cannot find ... --plan-for")

    monkeypatch.setattr(cluster_module, "launchable_node_types", not_found)
    with pytest.raises(ClusterDiscoveryError, match="--plan-for"):
        autoscaling_shape(GPU_LESS_NOW)
    # With GPUs alive now, those are planned for.
    with_gpu = ClusterShape(total_cpus=8, total_gpus=1, nodes=({"CPU": 8, "GPU": 1},))
    assert autoscaling_shape(with_gpu) is with_gpu


def test_a_plan_on_the_cpu_is_refused_while_gpu_nodes_can_be_launched():
    shape = launchable_shape([GPU_SMALL])
    with pytest.raises(ResourceError, match="--autoscaling: the plan puts mit_b0 on the CPU"):
        refuse_cpu_trials({"mit_b0": 0.0, "mit_b1": 0.5}, shape)
    refuse_cpu_trials({"mit_b0": 0.25, "mit_b1": 1.0}, shape)
    refuse_cpu_trials({"mit_b0": 0.0}, launchable_shape([CPU_ONLY]))  # no GPU to be had


def test_the_gcs_cluster_config_comes_first(monkeypatch, tmp_path):
    """Where the autoscaler reports its node groups to the GCS (KubeRay's does), they are used
    as reported: resources, min and max count; -1 (no limit) is planned as many nodes."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 4}, max_count=0),
        autoscaler_pb2.NodeGroupConfig(name="a100", resources={"CPU": 12, "GPU": 8,
                                                               "gpu_memory_80gb": 1},
                                       min_count=1, max_count=-1)])
    monkeypatch.setattr(cluster_module, "gcs_cluster_config", lambda: config)
    head, a100 = launchable_node_types()
    assert (head.max_workers, head.gpus) == (0, 0)
    assert (a100.cpus, a100.gpus, a100.gpu_memory_gb, a100.min_workers) == (12, 8, 80, 1)
    assert a100.max_workers == cluster_module.UNLIMITED_NODES
    shape = launchable_shape([head, a100])
    assert shape.total_gpus == 8 * cluster_module.UNLIMITED_NODES and shape.gpu_memory_gb == 80


# -- which node type each trial goes to ----------------------------------------------------------
def sized_cluster(small_cpus: float = 8, large_cpus: float = 16) -> ClusterShape:
    return launchable_shape(node_types_from_autoscaling_config({"available_node_types": {
        "gpu_small": {"resources": {"CPU": small_cpus, "GPU": 1, "gpu_memory_24gb": 1},
                      "max_workers": 4},
        "gpu_large": {"resources": {"CPU": large_cpus, "GPU": 1, "gpu_memory_48gb": 1},
                      "max_workers": 2}}, "max_workers": 6}))


def plan_fixed(shares: str, shape: ClusterShape, cpus_per_trial: float | None = None):
    """Two backbones at full size without bf16 or checkpointing: mit_b0 needs about 11 GB,
    mit_b5 about 36 GB (its parameters, gradients and momentum alone are 2.4 GB)."""
    backbones = ["mit_b0", "mit_b5"]
    train = TrainConfig(backbones=backbones, epochs=2, amp="off", activation_checkpointing="off")
    config = LaunchConfig(train=train, gpus_per_trial=shares, autoscaling=True,
                          cpus_per_trial=cpus_per_trial)
    workload = Workload(train_frames=100, epochs=2, batch_size=2, min_size=800, amp="off",
                        activation_checkpointing="off")
    return plan_run(config, trial_specs(backbones, 0.005, []), shape, workload)


def test_each_trial_asks_for_the_smallest_gpu_size_that_holds_its_share():
    resources, plan = plan_fixed("mit_b0=0.6,mit_b5=1", sized_cluster())
    # 0.6 of 24 GB holds mit_b0; a whole 24 GB GPU does not hold mit_b5, a 48 GB one does.
    assert resources["mit_b0"].gpu_memory_resource == "gpu_memory_24gb"
    assert resources["mit_b5"].gpu_memory_resource == "gpu_memory_48gb"
    assert resources["mit_b5"].as_bundle() == {"CPU": 16, "GPU": 1, "gpu_memory_48gb": 0.001}
    # CPUs: the GPU share of the type's CPUs (0.6 x 8, whole CPUs from one up; 1 x 16).
    assert (resources["mit_b0"].cpu, resources["mit_b5"].cpu) == (4, 16)
    assert {t.backbone: (t.gpu_memory_gb, t.cpus) for t in plan.trials} == {
        "mit_b0": (24, 4), "mit_b5": (48, 16)}
    # A share too small for the 24 GB GPUs goes to the 48 GB ones.
    resources, _ = plan_fixed("0.3", sized_cluster())
    assert resources["mit_b0"].gpu_memory_resource == "gpu_memory_48gb"
    assert resources["mit_b0"].cpu == 4  # 0.3 x 16


def test_cpus_per_trial_given_is_kept_and_one_gpu_size_routes_nothing():
    resources, _ = plan_fixed("1", sized_cluster(), cpus_per_trial=3)
    assert [r.cpu for r in resources.values()] == [3, 3]
    one_size = launchable_shape(node_types_from_autoscaling_config({"available_node_types": {
        "gpu": {"resources": {"CPU": 8, "GPU": 1, "gpu_memory_80gb": 1}, "max_workers": 2}}}))
    resources, _ = plan_fixed("0.5", one_size)
    assert all(r.gpu_memory_resource is None and r.cpu == 4 for r in resources.values())
    assert resources["mit_b0"].as_bundle() == {"CPU": 4, "GPU": 0.5}


def test_a_gpu_node_that_states_no_memory_routes_nothing():
    shape = ClusterShape(total_cpus=24, total_gpus=2, nodes=(
        {"CPU": 8, "GPU": 1, "gpu_memory_24gb": 1}, {"CPU": 16, "GPU": 1}))
    resources, _ = plan_fixed("1", shape)
    assert all(r.gpu_memory_resource is None for r in resources.values())
    assert all(r.cpu == 8 for r in resources.values())  # the least CPU-rich GPU node's
