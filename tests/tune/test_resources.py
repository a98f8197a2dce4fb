import re

import pytest

from crossdet_ray.tune.resources import (
    DEFAULT_GPU_MEMORY_GB,
    ClusterShape,
    ResourceError,
    TrialResources,
    assign_workers,
    check_feasible,
    cluster_gpu_memory_gb,
    parse_gpus_per_trial,
    parse_workers_per_trial,
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


# -- data-parallel workers (--workers-per-trial) ------------------------------------------------
def _workers(text: str, gpus: float, batch: int = 4, cpus: float = 2.0, backbone="mit_b0"):
    plan = {backbone: TrialResources(cpu=cpus, gpu=gpus)}
    return assign_workers(plan, parse_workers_per_trial(text, [backbone]), batch)[backbone]


def test_auto_workers_are_the_trials_whole_gpus_else_one():
    assert _workers("auto", gpus=2).workers == 2
    assert _workers("auto", gpus=0.5).workers == 1
    assert _workers("auto", gpus=0).workers == 1
    assert _workers("mit_b5=4,default=1", gpus=0, backbone="mit_b0").workers == 1
    assert _workers("mit_b5=4,default=1", gpus=4, backbone="mit_b5").workers == 4


def test_a_two_worker_cpu_trial_splits_its_cpus_between_its_process_and_workers():
    trial = _workers("2", gpus=0, cpus=2)
    assert trial.workers == 2 and trial.data_parallel
    process, worker = trial.as_bundle(), trial.worker_bundle()
    assert "GPU" not in worker and "GPU" not in process
    # Everything held together fits in the trial's 2 CPUs, and each worker gets most of one.
    assert process["CPU"] + 2 * worker["CPU"] <= 2 + 1e-9
    assert worker["CPU"] >= 0.9


def test_each_gpu_worker_holds_one_whole_gpu():
    trial = _workers("auto", gpus=2, cpus=8)
    assert trial.worker_bundle()["GPU"] == 1.0 and "GPU" not in trial.as_bundle()


@pytest.mark.parametrize("text, gpus, batch, cpus, message", [
    ("1.5", 0, 4, 2, "--workers-per-trial: '1.5' is not a whole number"),
    ("0", 0, 4, 2, "--workers-per-trial: 0 must be at least 1"),
    ("mit_b5=2", 0, 4, 2, "--workers-per-trial: no value for mit_b0"),
    ("2", 0.5, 4, 2, "each need one whole GPU"),
    ("3", 2, 6, 2, "--gpus-per-trial 2 with --workers-per-trial 3"),
    ("2", 0, 3, 2, "--batch-size 3 is not divisible by --workers-per-trial 2"),
    ("2", 0, 4, 0.2, "raise --cpus-per-trial to at least 0.3"),
])
def test_bad_worker_requests_are_explained(text, gpus, batch, cpus, message):
    with pytest.raises(ResourceError, match=re.escape(message)):
        _workers(text, gpus=gpus, batch=batch, cpus=cpus)


def test_data_parallel_trials_run_only_as_many_at_once_as_fit_whole():
    from crossdet_ray.tune.launcher import max_concurrent_trials

    two_workers = TrialResources(cpu=2, gpu=0, workers=2)
    # Two such trials on 2 CPUs: the second's process would hold CPU its workers need.
    assert max_concurrent_trials([two_workers, two_workers], NO_GPU) == 1
    assert max_concurrent_trials([TrialResources(cpu=1, gpu=0)] * 2, NO_GPU) is None
    assert max_concurrent_trials([two_workers, two_workers], NO_GPU, autoscaling=True) is None


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
