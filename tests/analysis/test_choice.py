"""The pieces of the evaluation that need no Ray: which checkpoint, the Pareto choice, a
report when every trial failed, and checkpoints that are not ours."""

from __future__ import annotations

import json

import pytest
import torch

from crossdet_ray.analysis.evaluation import choose, write_outputs
from crossdet_ray.analysis.plots import pareto_front
from crossdet_ray.analysis.sources import EvaluationPlan, TrialSource, choose_checkpoint
from crossdet_ray.engine.checkpoint import CheckpointError
from crossdet_ray.engine.inference import backbone_from_name, read_checkpoint
from crossdet_ray.engine.storage import RunStorage
from tests.analysis.runs import write_trial


def _row(name: str, value: float, ms: float) -> dict:
    return {"trial": name, "status": "ok", "map": value, "infer_ms_per_image": ms}


def test_pareto_front_and_choice():
    rows = [_row("b5", 0.500, 90.0), _row("b2", 0.495, 40.0), _row("b1", 0.470, 20.0),
            _row("b0", 0.300, 25.0), _row("slow_bad", 0.200, 95.0)]
    points = {r["trial"]: (r["infer_ms_per_image"], r["map"]) for r in rows}
    # b0 is beaten by b1 (faster and better), slow_bad by everyone.
    assert pareto_front(points) == ["b1", "b2", "b5"]
    choice = choose(rows + [{"trial": "failed", "status": "failed", "map": None,
                             "infer_ms_per_image": None}])
    assert choice["most_accurate"] == "b5"
    assert choice["fastest_close_to_best"] == "b2"  # 0.495 is within 1 point of 0.500


def test_best_map_falls_back_to_the_best_epoch_still_on_disk(tmp_path):
    trial = write_trial(tmp_path, "test_mit", "test_mit", maps=[0.4, 0.9, 0.2], seed=0)
    (trial / "checkpoints" / "epoch_002_loss_0.5000.pth").unlink()  # pruned
    storage = RunStorage.from_uri(str(trial))
    path, epoch, error = choose_checkpoint(storage, "test_mit", "best_map")
    assert (epoch, error) == (1, None) and path.endswith("epoch_001_loss_1.0000.pth")
    # A best_map_model.pth kept by the run is preferred.
    (trial / "checkpoints" / "best_map_model.pth").hardlink_to(
        trial / "checkpoints" / "epoch_003_loss_0.3333.pth")
    assert choose_checkpoint(storage, "test_mit", "best_map")[0].endswith("best_map_model.pth")
    assert choose_checkpoint(storage, "test_mit", "best")[0].endswith("best_model.pth")
    assert choose_checkpoint(storage, "test_mit", "final")[0].endswith(
        "test_mit_final_complete.pth")
    (trial / "checkpoints" / "test_mit_final_complete.pth").unlink()
    path, _, error = choose_checkpoint(storage, "test_mit", "final")
    assert path is None and "did not finish" in error


def test_checkpoints_that_are_not_crossattentiondet(tmp_path):
    foreign = tmp_path / "mit_b0_other.pth"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="is not a CrossAttentionDet checkpoint"):
        read_checkpoint(foreign)
    nameless = tmp_path / "model.pth"
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 4)}, nameless)
    with pytest.raises(CheckpointError, match="cannot tell its backbone"):
        read_checkpoint(nameless)
    assert backbone_from_name("runs/mit_b2/checkpoints/best_model.pth") == "mit_b2"
    assert backbone_from_name("mit_b5_final.pth") == "mit_b5"
    assert backbone_from_name("mit_b55.pth") is None


def test_a_report_when_every_trial_failed(tmp_path):
    plan = EvaluationPlan(source=str(tmp_path), is_run=True, out_dir=str(tmp_path / "out"),
                          trials=[TrialSource("mit_b0", "mit_b0", None, error="no folder x")],
                          data_dir=str(tmp_path), split="test")
    outcome = write_outputs(plan, {"mit_b0": {"error": "no folder x"}}, {})
    assert outcome.exit_code == 1
    report = (tmp_path / "out" / "report.html").read_text()
    assert "No trial could be evaluated" in report and "no folder x" in report
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["trials"][0]["status"] == "failed"


def test_a_gpu_share_on_a_cluster_without_gpus_runs_on_the_cpu(monkeypatch, caplog):
    import crossdet_ray.analysis.evaluation as evaluation

    monkeypatch.setattr(evaluation.ray, "cluster_resources", lambda: {"CPU": 2.0})
    trial = TrialSource("mit_b5", "mit_b5", "x.pth", cpu=4.0, gpu=0.5)
    assert evaluation._fit_to_cluster(trial, 5) == (2.0, 0.0)
    assert "trained with 0.5 GPU but this Ray cluster has 0" in caplog.text
    monkeypatch.setattr(evaluation.ray, "cluster_resources",
                        lambda: {"CPU": 16.0, "GPU": 1.0})
    assert evaluation._fit_to_cluster(trial, 5) == (4.0, 0.5)  # the share it trained with
    # A checkpoint from a folder: an equal part of the cluster.
    assert evaluation._fit_to_cluster(TrialSource("a", "mit_b0", "a.pth"), 4) == (4.0, 0.25)
