import pytest

from crossdet_ray.tune.resources import (
    ClusterShape,
    ResourceError,
    TrialResources,
    check_feasible,
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
    ("mit_b4=1", "no share for mit_b0"),
    ("mit_b4", "not a number"),
    ("mit_b4:1,default=1", "not NAME=SHARE"),
])
def test_bad_gpu_flags_are_explained(text, message):
    with pytest.raises(ResourceError, match=message):
        parse_gpus_per_trial(text, ALL)


def test_auto_is_cpu_only_without_gpus():
    plan = plan_resources(parse_gpus_per_trial("auto", ALL), ALL, 1, NO_GPU, None)
    assert all(r.gpu == 0 for r in plan.values())
    assert all(r.cpu == pytest.approx(0.4) for r in plan.values())  # 2 CPUs shared by 5


def test_auto_gives_whole_gpus_when_there_are_enough():
    cluster = ClusterShape(total_cpus=40, total_gpus=5, nodes=({"CPU": 40, "GPU": 5},))
    plan = plan_resources(parse_gpus_per_trial("auto", ALL), ALL, 1, cluster, None)
    assert {r.gpu for r in plan.values()} == {1.0}
    assert {r.cpu for r in plan.values()} == {8.0}


def test_auto_sizes_fractions_to_memory_need():
    plan = plan_resources(parse_gpus_per_trial("auto", ALL), ALL, 1, ONE_GPU, 2)
    assert 0 < plan["mit_b0"].gpu < plan["mit_b2"].gpu < plan["mit_b5"].gpu <= 1
    assert plan["mit_b0"].cpu == 2


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
