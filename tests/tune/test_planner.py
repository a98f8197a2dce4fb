"""The makespan planner: plans that fit memory and GPUs, and end the five sooner than one GPU each.

Every expected figure is computed here from the backbone registry and the cost model's stated
rules (docs/scale.md), not read back from the planner."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from crossdet_ray.backbones import BACKBONE_NAMES, BACKBONE_REGISTRY
from crossdet_ray.tune.planner import (
    Allocation,
    GpuNode,
    PlanForError,
    TrialRequest,
    Workload,
    parse_plan_for,
    plan_trials,
    simulate,
)
from tests.tune.helpers import ROOT

FIVE = [TrialRequest(b, b) for b in reversed(BACKBONE_NAMES)]  # start order: longest first
REFERENCE = Workload(train_frames=7800, epochs=30, batch_size=2, min_size=800)
CLUSTERS = ["1x24", "1x80", "4x80", "8x80", "2x8x80"]


def hours_alone(backbone: str, workload: Workload) -> float:
    """One trial alone on one GPU: steps x the registry's A100 step, scaled by batch and pixels."""
    steps = workload.epochs * math.ceil(workload.train_frames / workload.batch_size)
    step = (BACKBONE_REGISTRY[backbone].gpu_step_s * workload.batch_size / 2
            * (workload.min_size / 800) ** 2)
    return steps * step / 3600


def test_plan_for_shapes():
    assert parse_plan_for("8x80") == [GpuNode(gpus=8, gpu_memory_gb=80, cpus=64)]
    assert parse_plan_for("2x4x80GB") == [GpuNode(gpus=4, gpu_memory_gb=80, cpus=32)] * 2
    for bad in ("8", "eightx80", "0x80", "2.5x80", "1x2x3x4", "8x-80"):
        with pytest.raises(PlanForError, match="--plan-for.*8x80"):
            parse_plan_for(bad)


def test_shared_gpus_split_throughput_and_queues_wait():
    one_gpu = [GpuNode(gpus=1, gpu_memory_gb=80, cpus=8)]
    work = hours_alone("mit_b0", REFERENCE)
    two = [TrialRequest("a", "mit_b0"), TrialRequest("b", "mit_b0")]
    # Alone on its GPU a trial runs at full speed, whatever its share.
    assert simulate(two[:1], [Allocation(0.3)], one_gpu, REFERENCE) == pytest.approx([work])
    # Two halves of one GPU: each gets half its throughput.
    assert simulate(two, [Allocation(0.5)] * 2, one_gpu, REFERENCE) == pytest.approx([2 * work] * 2)
    # A third half waits for the first two to end, then runs alone.
    three = two + [TrialRequest("c", "mit_b0")]
    assert simulate(three, [Allocation(0.5)] * 3, one_gpu, REFERENCE) == pytest.approx(
        [2 * work, 2 * work, 3 * work])
    # Two whole GPUs with two workers: 2 x 0.9 as fast.
    two_gpus = [GpuNode(gpus=2, gpu_memory_gb=80, cpus=16)]
    assert simulate(two[:1], [Allocation(2.0, workers=2)], two_gpus, REFERENCE) == \
        pytest.approx([work / 1.8])


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("batch", [2, 4, 8])
def test_plans_fit_memory_gpus_and_the_batch(cluster, batch):
    nodes = parse_plan_for(cluster)
    workload = Workload(train_frames=7800, epochs=30, batch_size=batch, min_size=800)
    plan = plan_trials(FIVE, nodes, workload)
    gpu_memory = nodes[0].gpu_memory_gb
    for trial in plan.trials:
        assert batch % trial.workers == 0, "a worker's share of the global batch is not whole"
        if trial.workers > 1:
            assert trial.gpus == trial.workers <= nodes[0].gpus  # one whole GPU per worker
        else:
            assert 0 < trial.gpus <= 1
        fits = trial.memory_gb_per_worker <= (trial.gpus if trial.gpus < 1 else 1) * gpu_memory + 0.05
        warned = any(trial.backbone in w for w in plan.warnings)
        assert fits or warned, f"{trial.trial} gets {trial.gpus} of a {gpu_memory} GB GPU " \
                               f"but needs {trial.memory_gb_per_worker} GB"
    # No instant of the plan asks more of any GPU than it has: replay Ray's placement rule
    # (shares fit one GPU, workers' GPUs are whole) over the predicted start and end times.
    assert_never_oversubscribed(plan, nodes, workload)
    work = sum(hours_alone(t.backbone, workload) for t in plan.trials)
    assert plan.lower_bound_hours == pytest.approx(work / sum(n.gpus for n in nodes), rel=1e-3)
    assert plan.predicted_makespan_hours >= plan.lower_bound_hours - 1e-3
    assert plan.predicted_makespan_hours == pytest.approx(
        max(t.predicted_hours for t in plan.trials), abs=2e-3)


def assert_never_oversubscribed(plan, nodes, workload):
    """Replays the plan: the GPUs held by trials running at one time never exceed the cluster."""
    ends = sorted({t.predicted_hours for t in plan.trials})
    # A trial on whole GPUs runs exclusively, so it started its hours alone before its end; a
    # shared one started no later than that. At every instant just before an end, the trials
    # running must fit. (Hours are rounded to 0.001 in the plan: compare with 0.005 slack.)
    for end in ends:
        running = [t for t in plan.trials if t.predicted_hours >= end - 0.005
                   and t.predicted_hours - hours_alone(t.backbone, workload) /
                   (t.workers * 0.9 ** math.log2(t.workers) if t.workers > 1 else 1.0)
                   < end - 0.005]
        whole = sum(t.gpus for t in running if t.workers > 1 or t.gpus >= 1)
        shared = sum(t.gpus for t in running if t.workers == 1 and t.gpus < 1)
        assert whole + shared <= sum(n.gpus for n in nodes) + 1e-9


def test_eight_80gb_gpus_beat_one_gpu_per_backbone():
    plan = plan_trials(FIVE, parse_plan_for("8x80"), REFERENCE)
    one_each = max(hours_alone(b, REFERENCE) for b in BACKBONE_NAMES)  # mit_b5 alone
    assert plan.one_gpu_each_hours == pytest.approx(one_each, rel=1e-3)
    assert plan.predicted_makespan_hours < 0.8 * one_each
    # The large backbones get several GPUs, the small ones share.
    by = {t.backbone: t for t in plan.trials}
    assert by["mit_b5"].workers > 1 and by["mit_b0"].gpus < 1


def test_on_one_gpu_all_five_share_it_and_the_plan_is_the_lower_bound():
    plan = plan_trials(FIVE, parse_plan_for("1x80"), REFERENCE)
    assert sum(t.gpus for t in plan.trials) <= 1 + 1e-9  # all five run at once
    work = sum(hours_alone(b, REFERENCE) for b in BACKBONE_NAMES)
    assert plan.predicted_makespan_hours == pytest.approx(work, rel=1e-3)


def test_a_backbone_too_large_for_the_gpu_is_warned_about():
    big = Workload(train_frames=7800, epochs=30, batch_size=8, min_size=800)
    plan = plan_trials(FIVE, parse_plan_for("1x24"), big)
    assert any("mit_b5 needs about" in w and "--min-size" in w for w in plan.warnings)


def test_workers_given_by_the_user_are_kept():
    plan = plan_trials(FIVE, parse_plan_for("8x80"), REFERENCE,
                       workers={b: 1 for b in BACKBONE_NAMES})
    assert {t.workers for t in plan.trials} == {1}


def test_plan_only_prints_writes_plan_json_and_starts_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "all_backbones.py"), "--plan-only",
         "--plan-for", "2x4x80", "--log-dir", str(tmp_path), "--name", "sizing",
         "--synthetic-images", "8", "--synthetic-frame-size", "64", "--epochs", "3"],
        capture_output=True, text=True, timeout=300, env=_no_ray_address())
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "sizing" / "plan.json").read_text())
    assert {"trials", "predicted_makespan_hours", "lower_bound_hours", "cluster"} <= plan.keys()
    assert [t["trial"] for t in plan["trials"]] == list(reversed(BACKBONE_NAMES))
    for trial in plan["trials"]:
        assert {"trial", "backbone", "gpus", "workers", "cpus", "predicted_hours"} <= trial.keys()
    assert plan["cluster"]["gpus"] == 8 and len(plan["cluster"]["nodes"]) == 2
    assert "predicted makespan" in result.stdout and "mit_b5" in result.stdout
    assert sorted(p.name for p in (tmp_path / "sizing").iterdir()) == ["plan.json"]
    assert "Ray" not in result.stderr.replace("Ray Tune", "")  # no Ray was started


def test_bad_plan_for_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "all_backbones.py"), "--plan-only",
         "--plan-for", "eight", "--log-dir", str(tmp_path), "--synthetic-images", "8",
         "--synthetic-frame-size", "64"],
        capture_output=True, text=True, timeout=300, env=_no_ray_address())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("crossdet_ray: error: --plan-for")
    assert "Traceback" not in result.stderr


def _no_ray_address():
    import os

    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
