import pytest

from crossdet_ray.tune.resources import (
    DEFAULT_GPU_MEMORY_GB,
    ClusterShape,
    ResourceError,
    TrialResources,
    check_feasible,
    cluster_gpu_memory_gb,
    parse_gpus_per_trial,
    plan_resources,
    torch_threads_for,
)

ALL = ["mit_b0", "mit_b1", "mit_b2", "mit_b4", "mit_b5"]
ONE_GPU = ClusterShape(total_cpus=16, total_gpus=1, nodes=({"CPU": 16, "GPU": 1},),
                       gpu_memory_gb=80)
NO_GPU = ClusterShape(total_cpus=2, total_gpus=0, nodes=({"CPU": 2, "GPU": 0},))


def test_number_fraction_and_per_backbone_shares():
    assert parse_gpus_per_trial("0.2", ALL).share_for("mit_b5") == 0.2
    request = parse_gpus_per_trial("mit_b4=1,mit_b5=1,default=0.5", ALL)
    assert request.share_for("mit_b4") == 1 and request.share_for("mit_b0") == 0.5


@pytest.mark.parametrize("text, message", [
    ("lots", "not a number"),
    ("-1", ">= 0"),
    ("1.5", "whole number"),
    ("mit_b9=1,default=1", "unknown backbone mit_b9"),
    ("mit_b4=1", "no value for mit_b0"),
    ("mit_b4", "not a number"),
    ("mit_b4:1,default=1", "not NAME=VALUE"),
])
def test_bad_gpu_flags_are_explained(text, message):
    with pytest.raises(ResourceError, match=message):
        parse_gpus_per_trial(text, ALL)


def test_auto_is_cpu_only_without_gpus():
    plan = plan_resources(parse_gpus_per_trial("auto", ALL), ALL, 1, NO_GPU, None)
    assert all(r.gpu == 0 for r in plan.values())
    assert all(r.cpu == pytest.approx(0.4) for r in plan.values())  # 2 CPUs shared by 5


def test_impossible_requests_fail_with_advice():
    plan = plan_resources(parse_gpus_per_trial("1", ALL), ALL, 1, NO_GPU, None)
    with pytest.raises(ResourceError, match="no GPU.*--gpus-per-trial 0"):
        check_feasible(plan, NO_GPU)
    with pytest.raises(ResourceError, match="largest node has 1 GPU"):
        check_feasible({"mit_b5": TrialResources(cpu=1, gpu=2)}, ONE_GPU)
    with pytest.raises(ResourceError, match="16 CPU"):
        check_feasible({"mit_b5": TrialResources(cpu=32, gpu=0)}, ONE_GPU)
    check_feasible(plan, NO_GPU, autoscaling=True)  # nodes to come may have GPUs


def test_threads_follow_the_cpu_share():
    assert torch_threads_for(0.4) == 1
    assert torch_threads_for(4) == 4


def test_gpu_memory_comes_from_the_nodes_stated_resources():
    small = {"CPU": 8, "GPU": 1, "gpu_memory_24gb": 1}
    large = {"CPU": 8, "GPU": 1, "gpu_memory_48gb": 1}
    head = {"CPU": 0}
    # cluster.yaml's node types: packed for the smallest GPU, whatever the head has.
    assert cluster_gpu_memory_gb([head, small, large], None) == 24
    assert cluster_gpu_memory_gb([head, large], None) == 48
    # A GPU node that states nothing has the planner's own GPU, else the default.
    assert cluster_gpu_memory_gb([large, {"CPU": 8, "GPU": 1}], 16.0) == 16
    assert cluster_gpu_memory_gb([{"CPU": 8, "GPU": 1}], None) == DEFAULT_GPU_MEMORY_GB
    assert cluster_gpu_memory_gb([head], 40.0) == 40
